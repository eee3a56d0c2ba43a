"""Pretrained teachers and students: local weights files (written here from real timm models, no
downloads) go through timm's loader, with a new head for another class count and an adapted stem
for another channel count; a file of another architecture is refused before anything loads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file

from noisystudent.config import Config, TrainConfig
from noisystudent.engine.build import build_model
from noisystudent.engine.distributed import DistEnv
from noisystudent.errors import CheckpointError
from noisystudent.models import ModelSpec


def _spec(num_classes: int = 10, in_chans: int = 1, name: str = "resnet10t") -> ModelSpec:
    return ModelSpec(
        name=name,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=32,
        class_names=[str(c) for c in range(num_classes)],
        mean=[0.5],
        std=[0.5],
    )


def _teacher(spec: ModelSpec, weights) -> torch.nn.Module:
    recipe = replace(TrainConfig(), pretrained_file=str(weights), drop_rate=0.2, drop_path_rate=0.1)
    cfg = Config()
    cfg.channels_last = False
    model, _ = build_model(spec, recipe, cfg, torch.device("cpu"), DistEnv(), None)
    return model


def _written(tmp_path, name="resnet10t", num_classes=10, in_chans=1, suffix=".safetensors"):
    torch.manual_seed(123)
    source = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"{name}-{num_classes}-{in_chans}{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_teacher_starts_from_exactly_the_file_weights(tmp_path, suffix):
    path, state = _written(tmp_path, suffix=suffix)
    model = _teacher(_spec(), path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state), [
        k for k in state if not torch.equal(loaded[k], state[k])
    ][:3]
    random_init = timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict()
    assert not torch.equal(random_init["conv1.0.weight"], loaded["conv1.0.weight"])  # not a coincidence of seeds


def test_another_class_count_gets_a_new_head_and_another_channel_count_an_adapted_stem(tmp_path):
    path, state = _written(tmp_path, num_classes=1000, in_chans=3)
    model = _teacher(_spec(num_classes=4, in_chans=1), path)
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (4, state["fc.weight"].shape[1])  # new head
    # timm's adapt_input_conv: an RGB stem becomes a grayscale one by summing over its channels
    assert torch.allclose(loaded["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    body = [k for k in state if not k.startswith(("fc.", "conv1.0."))]
    assert body and all(torch.equal(loaded[k], state[k]) for k in body)


def test_a_file_of_another_architecture_is_refused_naming_keys(tmp_path):
    path, _ = _written(tmp_path, name="resnet18")
    with pytest.raises(CheckpointError, match=r"does not fit timm model resnet10t \(.*(missing|unexpected|shape)"):
        _teacher(_spec(), path)
    with pytest.raises(CheckpointError, match="pretrained_file not found"):
        _teacher(_spec(), tmp_path / "nowhere.safetensors")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _Unsafe()}, pickled)
    with pytest.raises(CheckpointError, match="cannot be read as weights"):
        _teacher(_spec(), pickled)


class _Unsafe:
    """A pickled object: torch.load(weights_only=True) refuses it, and so must we."""


def test_teacher_stage_records_where_its_weights_came_from(smoke_config, tmp_path):
    import json

    import mlflow

    from noisystudent.stages.runner import StageRequest, run_single_stage

    path, _ = _written(tmp_path, name="test_efficientnet")  # the smoke ladder's teacher, 10 classes, grayscale
    out = tmp_path / "teacher"
    cfg = smoke_config("teacher.epochs=1", "tracking.log_models=false", f"teacher.pretrained_file={path}")
    run_single_stage(cfg, StageRequest("teacher", out))
    source = json.loads((out / "result.json").read_text())["weights_source"]
    assert source.startswith(f"file {path} (sha256 ")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    tags = client.get_run((out / "mlflow_run_id").read_text().strip()).data.tags
    assert tags["weights_source"] == source


_HUB_CHILD = """
import sys, torch
from noisystudent.models import ModelSpec, create_model
spec = ModelSpec(name="resnet10t", num_classes=4, in_chans=3, image_size=224, class_names=list("abcd"),
                 mean=[0.5] * 3, std=[0.5] * 3)
model = create_model(spec, pretrained=True)
torch.save(model.state_dict(), sys.argv[1])
"""


def _hub_run(tmp_path, cache):
    """create_model(pretrained=True) in a child that reaches the hub only through its local cache
    (HF_HUB_OFFLINE: the Hugging Face client reads the cache and never opens a socket)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    out = tmp_path / "loaded.pt"
    r = subprocess.run(
        [sys.executable, "-c", _HUB_CHILD, str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    return r, out


def test_pretrained_true_loads_timms_hub_weights_with_a_new_head(tmp_path):
    """The real hub path (timm -> huggingface_hub -> the cache layout it downloads into), with the
    weights a hub download would have left: ``models--timm--<id>/snapshots/<rev>/model.safetensors``."""
    torch.manual_seed(7)
    hub_model = timm.create_model("resnet10t", pretrained=False)  # 1000 classes, RGB, as published
    hub_id = hub_model.pretrained_cfg["hf_hub_id"]  # e.g. timm/resnet10t.c3_in1k
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.contiguous() for k, v in hub_model.state_dict().items()}
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))

    r, out = _hub_run(tmp_path, tmp_path / "hub")
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = torch.load(out, weights_only=True)
    assert loaded["fc.weight"].shape == (4, state["fc.weight"].shape[1])  # a new head for 4 classes
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], state[k]) for k in body)


def test_pretrained_true_out_of_the_hubs_reach_is_one_line_naming_the_way_out(tmp_path):
    r, _ = _hub_run(tmp_path, tmp_path / "empty-cache")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "pretrained=true: timm could not fetch the weights of resnet10t" in last and "pretrained_file=PATH" in last
