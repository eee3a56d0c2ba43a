"""The analysis stage on the shared smoke run: what it writes, where, and that it is right.

Scores are recomputed independently from the shards' indexes and compared with what analysis
wrote; the report is parsed (and screenshotted in headless Chromium where it is installed).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from noisystudent.analysis.result import HIGHEST, LOWEST, OOD_GROUP, AnalysisResult
from noisystudent.analysis.scores import OOD_SCORES, auroc, energy_score, msp_score
from noisystudent.data.audit import hidden_fields_of
from noisystudent.data.label_index import ood_scores_path, read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.selection import OODScoreError, SelectionRule, select_pseudo_labels
from noisystudent.resume import DoneMarker


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.headers = [], [], []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "th":
            self._in_th = True

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)


def parse_report(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text())
    return p


def test_every_generation_analysed_with_all_scores(smoke_run):
    cfg, run_dir, rows = smoke_run
    for g in range(len(rows)):
        summary = _summary(run_dir, g)
        assert set(summary.ood) == set(OOD_SCORES)
        for m in summary.ood.values():
            assert 0.0 <= m.auroc <= 1.0 and 0.0 <= m.fpr95 <= 1.0
        # the best score is the validation split's best, judged on the held-out rest of the tagged corpus
        choice = summary.best_choice
        assert (
            set(choice.validation_auroc) == set(OOD_SCORES)
            and choice.validation_ood + choice.test_ood == summary.ood_tagged
        )
        assert summary.best_score == choice.score == max(choice.validation_auroc, key=choice.validation_auroc.get)
        assert summary.best_auroc == choice.test_auroc and 0.0 <= summary.best_auroc <= 1.0
        assert 0.0 <= summary.probe_top1 <= 1.0
        assert {LOWEST, HIGHEST, OOD_GROUP} == set(summary.consistency)
        low, high = summary.consistency[LOWEST], summary.consistency[HIGHEST]
        assert low.n == high.n == cfg.analysis.consistency_samples
        assert low.mean_confidence < high.mean_confidence and -1.0 <= low.mean_cosine <= 1.0
        assert summary.ood_tagged > 0 and summary.samples > summary.ood_tagged


def _summary(run_dir: Path, g: int) -> AnalysisResult:
    return DoneMarker(run_dir / f"gen-{g}" / "analysis" / "summary.json", AnalysisResult).read()


def test_scores_beside_shards_match_an_independent_recomputation(smoke_run):
    _, run_dir, _ = smoke_run
    manifest = LabelManifest.load(run_dir / "gen-2" / "labels")  # generation 1's model labeled these
    all_scores, is_ood = {s: [] for s in OOD_SCORES}, []
    for shard in manifest.shards:
        ix = read_index(shard.output)
        with np.load(ood_scores_path(shard.output)) as z:
            assert np.array_equal(z["keys"], ix.keys)  # same keys, same order as the shard
            assert np.allclose(z["msp"], msp_score(ix.probs.astype(np.float64)), atol=2e-3)  # probs are float16
            assert np.allclose(z["energy"], energy_score(logsumexp=ix.logsumexp), atol=1e-4)
            for s in OOD_SCORES:
                assert np.isfinite(z[s]).all()
                all_scores[s].append(z[s])
        hidden = hidden_fields_of(shard.input)  # an independent reading of the tags
        is_ood += [bool(hidden[k].get("ood")) for k in ix.keys.tolist()]
    summary = _summary(run_dir, 1)
    for s in OOD_SCORES:
        assert auroc(np.concatenate(all_scores[s]), np.asarray(is_ood)) == pytest.approx(summary.ood[s].auroc, abs=1e-3)


def test_ood_scores_drive_selection(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    shards = LabelManifest.load(run_dir / "gen-2" / "labels").outputs
    n = sum(len(read_index(s).keys) for s in shards)
    sel = select_pseudo_labels(shards, 10, SelectionRule(ood_score="knn", ood_drop_fraction=0.25))
    assert sel.dropped_ood == round(0.25 * n) and sel.kept_unique == n - sel.dropped_ood
    knn = np.concatenate([np.load(ood_scores_path(s))["knn"] for s in shards])
    kept = np.concatenate([sel.repeats_of(s) > 0 for s in shards])
    assert knn[kept].max() <= knn[~kept].min()  # exactly the most OOD-looking quarter went
    lonely = tmp_path / Path(shards[0]).name
    shutil.copy(shards[0], lonely)
    shutil.copy(Path(shards[0]).with_name(Path(shards[0]).name[:-4] + ".index.npz"), tmp_path)
    with pytest.raises(OODScoreError, match=r"ood\.npz is missing"):
        select_pseudo_labels([str(lonely)], 10, SelectionRule(ood_score="knn", ood_drop_fraction=0.1))


def test_generation_report_renders(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    report = run_dir / "gen-1" / "analysis" / "report.html"
    parsed = parse_report(report)
    assert parsed.sections == ["ood", "probes", "pictures", "galleries", "calibration", "labels"]
    assert {"score", "AUROC", "FPR95", "probe top-1", "mean cosine"} <= set(parsed.headers)
    assert len(parsed.images) >= 6  # histograms, embeddings, 3 galleries, reliability: all embedded
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # a real browser renders it (Chromium is optional on CI machines)
        shot = tmp_path / "report.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={shot}",
                "--window-size=1200,2000",
                report.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert shot.stat().st_size > 20_000


def test_run_report_compares_generations_and_mlflow_has_it(smoke_run):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, rows = smoke_run
    data = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert [r["generation"] for r in data["generations"]] == [0, 1, 2]
    parsed = parse_report(run_dir / "analysis" / "report.html")
    assert parsed.sections[:2] == ["ood", "probes"]
    assert {f"{s} AUROC" for s in OOD_SCORES} <= set(parsed.headers)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    parent_id = (run_dir / "mlflow_parent_run_id").read_text().strip()
    assert "analysis" in {a.path for a in client.list_artifacts(parent_id)}
    for g in range(len(rows)):
        run_id = (run_dir / f"gen-{g}" / "mlflow_run_id").read_text().strip()
        metrics = client.get_run(run_id).data.metrics
        assert {f"ood_auroc_{s}" for s in OOD_SCORES} | {"probe_top1_penultimate"} <= set(metrics)
        assert metrics["ood_auroc_best"] == pytest.approx(_summary(run_dir, g).best_auroc)
        files = {a.path for a in client.list_artifacts(run_id, "analysis")}
        assert "analysis/report.html" in files and "analysis/embeddings.png" in files


def test_with_without_low_confidence_experiment(smoke_run):
    from noisystudent.analysis.run import analyze_run
    from noisystudent.data import pseudo_labels as shards
    from noisystudent.experiments.with_without import with_without

    cfg, run_dir, _ = smoke_run
    # the tiny smoke teacher is unsure of everything: "high" = its median confidence
    high_t = round(float(np.median(shards.load_table(run_dir / "gen-1" / "labels").confidence)), 3)
    cfg = cfg.with_overrides({"analysis.high_threshold": high_t})
    result = with_without(cfg, run_dir, generation=1)
    low, high = result.rows
    assert (low.threshold, high.threshold) == (0.0, high_t)
    assert low.pl_kept_unique > high.pl_kept_unique > 0  # the high threshold removed images
    assert low.steps == high.steps  # same budget
    for r in (low, high):
        assert 0.0 <= r.test_top1 <= 1.0 and 0.0 <= r.probe_top1 <= 1.0 and set(r.ood) == set(OOD_SCORES)
    assert "Keeping the low-confidence images changed test top-1 by" in result.finding
    out = run_dir / "analysis" / "with-without"
    assert parse_report(out / "report.html").sections == ["with-without"]
    analyze_run(cfg)  # the run-level report now carries the experiment's table
    assert "with-without" in parse_report(run_dir / "analysis" / "report.html").sections
