"""Choosing images for people to label, exporting them, and bringing the labels back, through the
real commands, a real smoke run and a real Label Studio server."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_script, smoke_overrides

from noisystudent.data.imagefolder import scan_image_folder
from noisystudent.data.label_index import read_feature_rows, read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.pseudo_stream import members_by_offset
from noisystudent.data.shard_io import SkipCounter


def _select(run_dir: Path, data: Path, out: Path, *args: str):
    return run_script(
        "select_for_labeling.py", "--out", str(out), *args, overrides=[*smoke_overrides(data, run_dir)], timeout=600
    )


def _import(export: Path, export_dir: Path, out: Path, overrides: list[str]):
    """``import-labels`` of a Label Studio JSON export of what ``select-for-labeling`` wrote to ``export_dir``."""
    return run_script(
        "import_labels.py", str(export), "--export-dir", str(export_dir), "--out", str(out), overrides=overrides
    )


def _all_margins(manifest: LabelManifest) -> list[tuple[float, str]]:
    """Every corpus image's margin score, read whole (the old way): the reference for the stream."""
    out = []
    for shard in manifest.shards:
        ix = read_index(shard.output)
        p = -np.sort(-ix.probs.astype(np.float64), axis=1)
        out += zip((1.0 - (p[:, 0] - p[:, 1])).tolist(), [f"{shard.input}/{k}" for k in ix.keys])
    return out


def test_the_most_uncertain_images_are_exported_verbatim_with_their_provenance(smoke_run, smoke_data, tmp_path):
    cfg, run_dir, _ = smoke_run
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")  # generation 0's model labeled these
    out = tmp_path / "export"
    _select(run_dir, smoke_data, out, "--generation", "0", "-n", "12", "--strategy", "margin")
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    expected = sorted(_all_margins(manifest), key=lambda t: -t[0])[:12]
    assert [r["source_shard"] + "/" + r["key"] for r in rows] == [name for _, name in expected]
    assert [float(r["score"]) for r in rows] == pytest.approx([s for s, _ in expected], abs=1e-6)
    assert {r["teacher_sha256"] for r in rows} == {manifest.teacher.sha256} and {r["strategy"] for r in rows} == {
        "margin"
    }
    # the bytes are the labeled shard's member, as they were
    selection = json.loads((out / "selection.json").read_text())
    for c, r in zip(selection["candidates"], rows):
        ((_, data),) = members_by_offset(c["labeled_shard"], read_index(c["labeled_shard"]), [c["row"]], SkipCounter())
        assert (out / r["file"]).read_bytes() == data
    # CVAT's ImageNet layout: <label>/<image>, which reads back as an ImageFolder of the training classes
    with zipfile.ZipFile(out / "cvat-imagenet.zip") as z:
        names = z.namelist()
        assert len(names) == 12 and all(n.count("/") == 1 for n in names)
        assert sorted(n.split("/")[1] for n in names) == sorted(Path(r["file"]).name for r in rows)
        z.extractall(tmp_path / "cvat")
    index = scan_image_folder(tmp_path / "cvat", scan_image_folder(cfg.data.labeled_dir).class_names)
    assert len(index.files) == 12
    assert {Path(p).parent.name for p, _ in index.files} == {r["predicted"] for r in rows}


def test_disagreement_picks_where_two_generations_changed_their_mind_and_is_on_record(smoke_run, smoke_data, tmp_path):
    """Generation 1's model against generation 0's, over the same corpus: the images whose soft
    labels moved most (total variation), and an MLflow run with the export's counts."""
    from mlflow.tracking import MlflowClient

    _, run_dir, _ = smoke_run
    new, old = (LabelManifest.load(run_dir / f"gen-{g}" / "labels") for g in (2, 1))
    moved = []
    for a, b in zip(new.shards, old.shards):
        ia, ib = read_index(a.output), read_index(b.output)
        tv = 0.5 * np.abs(ia.probs.astype(np.float64) - ib.probs.astype(np.float64)).sum(1)
        moved += zip(tv.tolist(), [f"{a.input}/{k}" for k in ia.keys])
    out = tmp_path / "export"
    _select(run_dir, smoke_data, out, "--generation", "1", "-n", "10", "--strategy", "disagreement")
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    expected = sorted(moved, key=lambda t: -t[0])[:10]
    assert [r["source_shard"] + "/" + r["key"] for r in rows] == [name for _, name in expected]
    assert {r["teacher_sha256"] for r in rows} == {new.teacher.sha256}
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["export_images"] == 10 and run.data.tags["strategy"] == "disagreement"


def test_diverse_picks_spread_out_images_from_the_uncertain_pool(smoke_run, smoke_data, tmp_path):
    _, run_dir, _ = smoke_run
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")
    plain, diverse = tmp_path / "plain", tmp_path / "diverse"
    _select(run_dir, smoke_data, plain, "--generation", "0", "-n", "10", "--strategy", "margin")
    _select(run_dir, smoke_data, diverse, "--generation", "0", "-n", "10", "--strategy", "margin+diverse")
    pool = {name for _, name in sorted(_all_margins(manifest), key=lambda t: -t[0])[:100]}

    def chosen(out):
        return json.loads((out / "selection.json").read_text())["candidates"]

    def spread(cands):  # mean distance to the nearest other chosen image (normalised pooled features)
        x = np.concatenate([read_feature_rows(c["labeled_shard"], [c["row"]]) for c in cands])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        d = ((x[:, None] - x[None]) ** 2).sum(-1) + np.eye(len(x)) * 1e9
        return float(np.sqrt(d.min(1)).mean())

    picked = chosen(diverse)
    assert len(picked) == 10 and len({(c["source_shard"], c["key"]) for c in picked}) == 10
    assert {f"{c['source_shard']}/{c['key']}" for c in picked} <= pool  # from the 10 x 10 most uncertain
    assert spread(picked) > spread(chosen(plain))


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    import label_studio_server

    root = tmp_path_factory.mktemp("label-studio")
    server, reason = label_studio_server.start(root / "data", root / "files")
    if reason:
        pytest.skip(f"no Label Studio: {reason}")
    yield server, root / "files"
    server.stop()


def test_a_round_trip_through_label_studio_ends_in_a_trained_teacher(smoke_run, smoke_data, label_studio, tmp_path):
    """Export to Label Studio's local files, import the tasks through its API, label them as a
    person would (one skipped), export, import the export with our command, train a teacher."""
    from mlflow.tracking import MlflowClient

    ls, files = label_studio
    _, run_dir, _ = smoke_run
    out = files / "batch"  # a subdirectory of Label Studio's document root
    _select(run_dir, smoke_data, out, "--generation", "0", "-n", "8", "--label-studio-root", str(files))
    project = ls.api(
        "POST",
        "/api/projects/",
        {"title": "noisystudent", "label_config": (out / "label-studio-config.xml").read_text()},
    )
    ls.api(
        "POST", "/api/storages/localfiles/", {"project": project["id"], "title": "batch", "path": str(out / "images")}
    )
    tasks = json.loads((out / "label-studio-tasks.json").read_text())
    assert ls.api("POST", f"/api/projects/{project['id']}/import", tasks)["prediction_count"] == 8
    listed = ls.api("GET", f"/api/tasks/?project={project['id']}&page_size=100&fields=all")["tasks"]
    scores = {t["data"]["key"]: t["predictions"][0]["score"] for t in listed}
    assert scores == {t["data"]["key"]: t["predictions"][0]["score"] for t in tasks}  # the model's confidence
    first = listed[0]
    assert ls.get_bytes(first["data"]["image"]) == (out / "images" / Path(first["data"]["image"]).name).read_bytes()
    # a person labels seven (the opposite of the model's class where it can) and skips one
    names = scan_image_folder(smoke_data / "labeled" / "train").class_names
    answers = {}
    for t in listed[:7]:
        predicted = t["predictions"][0]["result"][0]["value"]["choices"][0]
        answers[t["data"]["key"]] = names[(names.index(predicted) + 1) % len(names)]
        result = [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [answers[t["data"]["key"]]]},
            }
        ]
        ls.api("POST", f"/api/tasks/{t['id']}/annotations/", {"result": result})
    ls.api("POST", f"/api/tasks/{listed[7]['id']}/annotations/", {"result": [], "was_cancelled": True})
    export = ls.api("GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    (tmp_path / "export.json").write_text(json.dumps(export))

    labeled = tmp_path / "new-labels"
    overrides = smoke_overrides(smoke_data, run_dir)
    _import(tmp_path / "export.json", out, labeled, overrides)
    result = json.loads((labeled / "import.json").read_text())
    assert result["imported"] == 7 and result["skipped"] == {"cancelled": 1}
    client = MlflowClient(f"sqlite:///{labeled / 'mlflow.db'}")  # the import is on record, with its counts
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["import_imported"] == 7 and run.data.metrics["import_skipped"] == 1
    got = scan_image_folder(labeled / "images", names)
    assert sorted((Path(p).name, names[t]) for p, t in got.files) == sorted(
        (Path(t["data"]["image"]).name, answers[t["data"]["key"]]) for t in listed[:7]
    )
    teacher = tmp_path / "teacher"
    run_script(
        "train_teacher.py", "--out", str(teacher), "--overlay", str(labeled / "labeled-set.yaml"), overrides=overrides
    )
    trained = json.loads((teacher / "result.json").read_text())
    assert (teacher / "model.pt").is_file() and trained["history"]
    assert str(labeled / "images") in (teacher / "config.yaml").read_text()  # it trained on the new set


def _model_outputs(model_path: Path, index):
    """The model's outputs on an ImageFolder (clean view, as the command computes them)."""
    from noisystudent.analysis.features import extract_split
    from noisystudent.config import load_config
    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.imagefolder import LabeledImages
    from noisystudent.models import load_model

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    model, spec = load_model(str(model_path), torch.device("cpu"), False)
    view = create_eval_transform(spec.data_config(cfg.data))
    return extract_split(
        model, LabeledImages(index, cfg.data.channels, view, 0, cfg.data.crop_pct), torch.device("cpu")
    )


def test_mislabeled_images_are_re_label_candidates_and_their_answers_become_overrides(smoke_run, smoke_data, tmp_path):
    """Five labeled images moved into the wrong class folder: the model disputes them, they are
    exported as re-label candidates, and the answers come back as data.label_overrides."""
    import shutil

    from noisystudent.config import load_config
    from noisystudent.data.imagefolder import labeled_train_index

    _, run_dir, _ = smoke_run
    labeled = tmp_path / "labeled"
    shutil.copytree(smoke_data / "labeled" / "train", labeled)
    index = scan_image_folder(labeled)
    names = index.class_names
    moved = {}
    for path, target in index.files[::20][:5]:  # one image from five places, each to the next class
        wrong = labeled / names[(target + 1) % len(names)] / Path(path).name
        shutil.move(path, wrong)
        moved[str(wrong.relative_to(labeled))] = names[target]
    overrides = [*smoke_overrides(smoke_data, run_dir), f"data.labeled_dir={labeled}"]
    out = tmp_path / "relabel"
    run_script(
        "select_for_labeling.py",
        "--out",
        str(out),
        "--generation",
        "0",
        "-n",
        "15",
        "--strategy",
        "suspicious",
        overrides=overrides,
    )
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    flagged = {r["labeled_path"]: r for r in rows}
    # the ranking is the model's probability of a class other than the given one, highest first
    after = scan_image_folder(labeled)
    split = _model_outputs(run_dir / "gen-0" / "teacher" / "model.pt", after)
    disputed = split.probs.copy()
    disputed[np.arange(len(disputed)), split.targets] = 0.0
    expected = np.argsort(-disputed.max(1), kind="stable")[:15]
    assert [r["labeled_path"] for r in rows] == [str(Path(after.files[i][0]).relative_to(labeled)) for i in expected]
    assert all(r["given"] == Path(r["labeled_path"]).parent.name for r in rows)
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert all(flagged[p]["given"] != moved[p] for p in set(moved) & set(flagged))
    # a person restores the true class of each flagged moved image (Label Studio's JSON export shape)
    tasks = json.loads((out / "label-studio-tasks.json").read_text())
    export = [
        {
            "id": i,
            "data": t["data"],
            "annotations": [
                {
                    "id": i,
                    "was_cancelled": False,
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [moved.get(t["data"]["labeled_path"], t["data"]["given"])]},
                        }
                    ],
                }
            ],
        }
        for i, t in enumerate(tasks)
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    back = tmp_path / "back"
    _import(tmp_path / "export.json", out, back, overrides)
    assert json.loads((back / "import.json").read_text())["relabeled"] == 15
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides, overlays=[back / "labeled-set.yaml"])
    fixed = {str(Path(p).relative_to(labeled)): names[t] for p, t in labeled_train_index(cfg.data).files}
    restored = set(moved) & set(flagged)
    assert all(fixed[p] == moved[p] for p in restored)
    assert len(fixed) == len(index.files)  # nothing added, nothing dropped


def test_any_checkpoint_labels_its_corpus_then_chooses(smoke_run, smoke_data, tmp_path):
    """--model: a checkpoint outside the run labels the corpus (into <out>/labels, through the
    label cache) and chooses from that pass."""
    from noisystudent.io import sha256_file

    _, run_dir, _ = smoke_run
    model = run_dir / "gen-0" / "teacher" / "model.pt"
    out = tmp_path / "export"
    _select(run_dir, smoke_data, out, "--model", str(model), "-n", "5", "--strategy", "entropy")
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    manifest = LabelManifest.load(out / "labels")
    assert len(rows) == 5 and {r["teacher_sha256"] for r in rows} == {sha256_file(model)} == {manifest.teacher.sha256}
    assert manifest.total_samples == sum(s.samples for s in manifest.shards) > 5
