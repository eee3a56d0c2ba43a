"""Config loading: YAML + --set overrides, typed validation, unknown keys named."""

from __future__ import annotations

import pytest
from conftest import REPO

from noisystudent.config import Config, ConfigError, TrainConfig, dump_config, flatten, load_config, to_dict


def test_shipped_configs_load_and_differ():
    default = load_config(REPO / "configs" / "default.yaml")
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    imagenet = load_config(REPO / "configs" / "imagenet.yaml")
    assert default.generations == 3 and default.data.channels == 1
    assert smoke.ladder[0].startswith("test_")
    assert imagenet.data.channels == 3 and imagenet.amp in ("bf16", "fp16")
    assert imagenet.ladder[0] != imagenet.ladder[-1]
    # the fine-tune overlay changes the teacher alone, over any base config
    tuned = load_config(REPO / "configs" / "imagenet.yaml", overlays=[str(REPO / "configs" / "finetune.yaml")])
    assert tuned.teacher.pretrained and tuned.teacher.lr < imagenet.teacher.lr and tuned.teacher.epochs < 50
    assert tuned.student == imagenet.student and tuned.data == imagenet.data


def test_overrides_reach_nested_fields_and_keep_stage_defaults():
    cfg = load_config(None, ["student.drop_path_rate=0.25", "student.augment.magnitude=5", "ladder=[a, b]"])
    assert cfg.student.drop_path_rate == 0.25
    assert cfg.student.augment.magnitude == 5.0
    # the student's own augment defaults survive a partial override (they differ from TrainConfig's)
    defaults = Config()
    assert defaults.student.augment.cutout != TrainConfig().augment.cutout
    assert cfg.student.augment.cutout == defaults.student.augment.cutout
    assert cfg.teacher.augment == defaults.teacher.augment
    assert cfg.ladder == ["a", "b"]


def test_override_wins_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  epochs: 7\n  lr: 0.1\n")
    cfg = load_config(path, ["teacher.epochs=9"])
    assert cfg.teacher.epochs == 9 and cfg.teacher.lr == 0.1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("student.bogus=1", "unknown config key 'student.bogus'"),
        ("nope=1", "unknown config key 'nope'"),
        ("teacher.epochs=abc", "config key 'teacher.epochs' must be an integer"),
        ("teacher.lr=[1]", "config key 'teacher.lr' must be a number"),
        ("tracking.enabled=maybe", "config key 'tracking.enabled' must be true/false"),
        ("data.channels=2", "config key 'data.channels'"),
        ("pseudo_label.threshold=1.5", "config key 'pseudo_label.threshold'"),
        ("teacher=3", "config key 'teacher' must be a mapping"),
        ("cluster.kind=address", "config key 'cluster.address'"),
        ("noequals", "must look like key.sub=value"),
        ("amp=fast", "config key 'amp' must be auto, off, bf16 or fp16"),
        ("tracking.enabled=yes", "config key 'tracking.enabled' must be true/false"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  labled_dir: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.labled_dir'"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml", ["seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert to_dict(load_config(path)) == to_dict(cfg)
    assert flatten(to_dict(cfg))["student.augment.num_ops"] == cfg.student.augment.num_ops


def test_every_config_key_has_help_and_docs_config_md_is_current():
    from noisystudent.config import config_reference, config_reference_markdown

    for key, _default, doc in config_reference():
        assert doc, f"config key {key} has no help text (setting(default, help) in noisystudent/config/)"
    assert (REPO / "docs" / "config.md").read_text() == config_reference_markdown() + "\n", (
        "docs/config.md is stale: regenerate with python -m noisystudent.config > docs/config.md"
    )


@pytest.mark.parametrize("override", ["teacher.init=teacher", "teacher.finetune_epochs=2", "teacher.unlabeled_ratio=2"])
def test_student_only_keys_are_errors_on_the_teacher(override):
    with pytest.raises(ConfigError, match=f"unknown config key '{override.split('=')[0]}'"):
        load_config(None, [override])
    student = load_config(None, ["student." + override.split(".", 1)[1]])  # the same key is fine on a student
    assert student.student != Config().student


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("student.init=warm", "config key 'student.init' must be scratch or teacher, got 'warm'"),
        ("teacher.optimizer=adam", "config key 'teacher.optimizer' must be adamw or sgd"),
        ("cluster.kind=ray", "config key 'cluster.kind' must be local, address, slurm or kubernetes"),
        (
            "pseudo_label.ood_score=maha",
            "config key 'pseudo_label.ood_score' must be '', msp, entropy, energy, mahalanobis, knn, react, "
            "scale or vim",
        ),
        ("data.channels=true", "config key 'data.channels' must be 1 or 3, got True"),
        ("ladder=[resnet18, 3]", "config key 'ladder[1]' must be a string, got 3"),
        ("data.mean=[0.5, x, 0.5]", "config key 'data.mean[1]' must be a number, got 'x'"),
        (
            "cluster.slurm.job_extra_directives=[1]",
            "config key 'cluster.slurm.job_extra_directives[0]' must be a string",
        ),
        ("data.unlabeled_shards=3", "config key 'data.unlabeled_shards' must be one of str | list"),
    ],
)
def test_choices_and_list_elements_are_checked(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_lists_and_unions_accept_their_element_types():
    cfg = load_config(
        None, ["data.mean=[1, 0.5, 0]", "data.std=[1, 1, 1]", "data.channels=3", "data.unlabeled_shards=[a.tar, b.tar]"]
    )
    assert cfg.data.mean == [1.0, 0.5, 0.0] and all(isinstance(v, float) for v in cfg.data.mean)
    assert cfg.data.unlabeled_shards == ["a.tar", "b.tar"]
    assert load_config(None, ["data.unlabeled_shards=x-{0..3}.tar"]).data.unlabeled_shards == "x-{0..3}.tar"


def test_generation_overrides_apply_to_one_generation_only():
    cfg = load_config(None, ["generation_overrides={2: {student.init: teacher, student.augment.magnitude: 2}}"])
    g2 = cfg.for_generation(2)
    assert g2.student.init == "teacher" and g2.student.augment.magnitude == 2.0
    assert g2.student.augment.num_ops == cfg.student.augment.num_ops  # the rest of the block is kept
    assert cfg.for_generation(1).student.init == cfg.student.init == "scratch"
    assert cfg.for_generation(3) is cfg


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("{2: {student.bogus: 1}}", "generation_overrides[2]: unknown config key 'student.bogus'"),
        ("{2: {student.epochs: many}}", "generation_overrides[2]: config key 'student.epochs' must be an integer"),
        ("{x: {seed: 1}}", "keys must be generation numbers"),
    ],
)
def test_bad_generation_overrides_fail_at_load(value, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"generation_overrides={value}"])
    assert fragment in str(err.value)


def test_ladder_refuses_a_smaller_student():
    from noisystudent.models import LadderError, check_ladder

    params = check_ladder(["test_efficientnet", "test_resnet"], 3, num_classes=10, in_chans=1)
    assert params[0] < params[1] == params[2] == params[3]
    with pytest.raises(
        LadderError, match="generation 1 student test_efficientnet .* is smaller than its teacher test_resnet"
    ):
        check_ladder(["test_resnet", "test_efficientnet"], 1, num_classes=10, in_chans=1)


def test_yaml_1_2_booleans_keep_off_and_yes_as_strings(tmp_path):
    # YAML 1.1 would read `amp: off` as False and reject it as "not a string"
    path = tmp_path / "c.yaml"
    path.write_text("amp: off\ntracking:\n  enabled: false\n")
    cfg = load_config(path, [])
    assert cfg.amp == "off" and cfg.tracking.enabled is False
    assert load_config(None, ["amp=off"]).amp == "off"
    assert load_config(None, ["amp=bf16", "tracking.enabled=true"]).tracking.enabled is True


def test_a_walltime_stays_a_time_in_a_file_and_in_set(tmp_path):
    # YAML 1.1 reads 12:00:00 as the base-60 integer 43200, which the str key then refused
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  slurm:\n    walltime: 12:00:00\n")
    assert load_config(path, []).cluster.slurm.walltime == "12:00:00"
    assert load_config(None, ["cluster.slurm.walltime=01:30:00"]).cluster.slurm.walltime == "01:30:00"
    assert load_config(None, ["data.image_size=64"]).data.image_size == 64  # plain numbers stay numbers


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generations: 2\nstudent:\n  epochs: 3\n  epochs: 30\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "line 4" in message
    assert "'epochs' is given twice (first at line 3)" in message


def test_amp_auto_resolves_per_device():
    import torch

    from noisystudent.engine.precision import cpu_has_native_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert Config().amp == "auto"
    assert resolve_amp("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "off")
    assert resolve_amp("off", cpu) == "off" and resolve_amp("bf16", cpu) == "bf16"


def test_keys_that_change_results_are_the_recipe_data_and_models_not_the_machinery():
    from noisystudent.config.changes import key_changes_results, result_changes

    for key in (
        "student.lr",
        "teacher.augment.magnitude",
        "data.image_size",
        "ladder",
        "seed",
        "pseudo_label.threshold",
        "generation_overrides.2.student.lr",
        "a_key_from_an_older_version",
    ):
        assert key_changes_results(key), key
    for key in (
        "device",
        "amp",
        "threads",
        "compile",
        "run_dir",
        "generations",
        "data.num_workers",
        "pseudo_label.batch_size",
        "cluster.n_workers",
        "cluster.slurm.queue",
        "tracking.tracking_uri",
        "analysis.knn_k",
        "log_every_steps",
        "max_nonfinite_steps",
    ):
        assert not key_changes_results(key), key
    stored = to_dict(Config())
    changed = Config()
    changed.student.lr, changed.cluster.n_workers, changed.generations = 0.01, 8, 5
    assert [(c.key, c.stored, c.requested) for c in result_changes(stored, changed)] == [("student.lr", 0.003, 0.01)]


def test_a_run_from_before_a_key_existed_resumes_unless_the_key_leaves_its_default():
    """A config.yaml written before data.label_overrides and the distill section existed: resuming it
    is no change while those keys keep their defaults (which is how the older version ran), and a
    change once one of them is set."""
    from noisystudent.config.changes import result_changes

    older = to_dict(Config())
    del older["data"]["label_overrides"], older["data"]["extra_labeled_dirs"], older["distill"]
    assert result_changes(older, Config()) == []
    distilled = Config()
    distilled.distill.model = "resnet10t_half"
    assert [(c.key, c.stored, c.requested) for c in result_changes(older, distilled)] == [
        ("distill.model", "(absent)", "resnet10t_half")
    ]


def test_every_shipped_config_and_cluster_overlay_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    for overlay in sorted((REPO / "configs" / "cluster").glob("*.yaml")):
        load_config(REPO / "configs" / "default.yaml", overlays=[str(overlay)])


def test_the_gpu_recipe_grows_its_students():
    import timm

    gpu = load_config(REPO / "configs" / "gpu.yaml")
    sizes = [sum(p.numel() for p in timm.create_model(name, in_chans=1).parameters()) for name in gpu.ladder]
    assert len(sizes) == 3 and sizes == sorted(set(sizes))  # every generation's student larger than its teacher
    assert gpu.device == "cuda" and gpu.cluster.gpus_per_worker == 1 and gpu.pseudo_label.decode == "auto"


def test_exponents_without_a_dot_are_numbers_in_yaml_and_set(tmp_path):
    """`--set student.lr=1e-3` and `lr: 5e-4` in a file are numbers, as YAML 1.2 reads them (PyYAML's 1.1
    rules read them as strings, and the typed check refused them); integers stay integers."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("teacher:\n  lr: 5e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(
        REPO / "configs" / "default.yaml",
        ["student.lr=1e-3", "export.tolerance=1e-12", "pseudo_label.threshold=3e-1", "seed=7"],
        overlays=[str(overlay)],
    )
    assert (cfg.student.lr, cfg.export.tolerance, cfg.pseudo_label.threshold) == (1e-3, 1e-12, 0.3)
    assert (cfg.teacher.lr, cfg.teacher.weight_decay) == (5e-4, 1e-5)
    assert cfg.seed == 7 and isinstance(cfg.seed, int)
