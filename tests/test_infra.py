"""Cluster examples in infra/ and configs/cluster/: they load, parse, and agree with the code that uses them."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import REPO

from noisystudent.config import load_config


@pytest.mark.parametrize("overlay", sorted(p.name for p in (REPO / "configs" / "cluster").glob("*.yaml")))
def test_cluster_overlays_load_on_both_shipped_configs(overlay):
    for base in ("default.yaml", "imagenet.yaml"):
        cfg = load_config(REPO / "configs" / base, overlays=[REPO / "configs" / "cluster" / overlay])
        assert cfg.cluster.kind in ("local", "address", "slurm", "kubernetes")
        if "gpu" in overlay:
            assert cfg.cluster.gpus_per_worker >= 1 and cfg.device == "cuda"


def test_kubernetes_manifests_parse_and_request_gpus():
    docs = [d for f in sorted((REPO / "infra" / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"DaskCluster", "Job", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    cluster = next(d for d in docs if d["kind"] == "DaskCluster")
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["args"][worker["args"].index("--resources") + 1] == "GPU=1"
    assert worker["volumeMounts"][0]["mountPath"] == "/data"
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in scheduler["resources"]["limits"]  # the scheduler needs no GPU


def test_committed_dask_cluster_matches_what_the_code_generates():
    pytest.importorskip("dask_kubernetes")
    from noisystudent.cluster import kubernetes_cluster_spec

    cfg = load_config(REPO / "configs" / "imagenet.yaml", overlays=[REPO / "configs" / "cluster" / "kubernetes-gpu.yaml"])
    committed = yaml.safe_load((REPO / "infra" / "kubernetes" / "dask-cluster.yaml").read_text())
    assert committed == kubernetes_cluster_spec(cfg.cluster)


def test_slurm_driver_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(REPO / "infra" / "slurm" / "pseudo_label.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
