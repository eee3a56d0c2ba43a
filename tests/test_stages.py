"""Each stage runs alone from its script; pseudo-labels are reused by a rerun."""

from __future__ import annotations

import json

from conftest import run_script as _run
from conftest import smoke_overrides

from noisystudent.analysis.result import AnalysisResult
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.resume import DoneMarker


def test_teacher_label_student_scripts(smoke_data, tmp_path):
    over = smoke_overrides(smoke_data, tmp_path / "unused") + ["tracking.enabled=false", "cluster.n_workers=1"]
    t = _run("train_teacher.py", "--out", str(tmp_path / "teacher"), overrides=over)
    assert "teacher finished" in t.stdout and (tmp_path / "teacher" / "model.pt").is_file()
    assert (tmp_path / "teacher" / "config.yaml").is_file()  # resolved config dumped beside the outputs

    labels = tmp_path / "labels"
    _run("pseudo_label.py", "--teacher", str(tmp_path / "teacher" / "model.pt"), "--out", str(labels), overrides=over)
    first = LabelManifest.load(labels)
    assert first.shards_labeled == len(first.shards) and first.shards_reused == 0
    mtimes = {p: p.stat().st_mtime_ns for p in labels.glob("*.tar")}

    again = _run(
        "pseudo_label.py", "--teacher", str(tmp_path / "teacher" / "model.pt"), "--out", str(labels), overrides=over
    )
    second = LabelManifest.load(labels)
    assert second.shards_reused == len(second.shards) and second.shards_labeled == 0
    assert {p: p.stat().st_mtime_ns for p in labels.glob("*.tar")} == mtimes
    assert second.total_samples == first.total_samples
    assert "pseudo-labeling finished" in again.stdout

    s = _run(
        "train_student.py",
        "--teacher",
        str(tmp_path / "teacher" / "model.pt"),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "student"),
        overrides=over + ["pseudo_label.threshold=0.0", "generation_overrides={1: {student.unlabeled_weight: 0.5}}"],
    )
    assert "student finished" in s.stdout
    # the script applies its generation's overrides, and dumps the resolved config
    assert "unlabeled_weight: 0.5" in (tmp_path / "student" / "config.yaml").read_text()
    result = json.loads((tmp_path / "student" / "result.json").read_text())
    assert result["spec"]["name"] == "test_resnet" and len(result["history"]) == 1
    assert result["history"][0]["train_pseudo_loss"] > 0

    a = _run(
        "analyze.py",
        "--model",
        str(tmp_path / "student" / "model.pt"),
        "--out",
        str(tmp_path / "analysis"),
        overrides=over,
    )
    assert "Analysis: ID-vs-OOD AUROC" in a.stdout and "report:" in a.stdout
    summary = DoneMarker(tmp_path / "analysis" / "summary.json", AnalysisResult).read()
    assert set(summary.ood) == {"msp", "entropy", "energy", "mahalanobis", "knn", "react", "scale", "vim"}
    assert (tmp_path / "analysis" / "report.html").stat().st_size > 10_000
