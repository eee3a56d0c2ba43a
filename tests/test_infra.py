"""Cluster examples in infra/ and configs/cluster/: they load, parse, and agree with the code that uses them."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
    docs = [
        d
        for f in sorted((REPO / "infra" / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
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
    from noisystudent.labeling.cluster import kubernetes_cluster_spec  # dask-kubernetes is in [dev]

    cfg = load_config(
        REPO / "configs" / "imagenet.yaml", overlays=[REPO / "configs" / "cluster" / "kubernetes-gpu.yaml"]
    )
    committed = yaml.safe_load((REPO / "infra" / "kubernetes" / "dask-cluster.yaml").read_text())
    assert committed == kubernetes_cluster_spec(cfg.cluster)


def test_slurm_driver_script_is_valid_bash():
    r = subprocess.run(
        ["bash", "-n", str(REPO / "infra" / "slurm" / "pseudo_label.sbatch")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_compose_stack_is_wellformed_and_binds_to_loopback():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "dask-scheduler", "dask-worker", "runner"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # UIs are not exposed beyond the host
        if name != "postgres":
            assert svc["image"] == "noisystudent:cpu" and "/data" in str(svc["volumes"])
    assert "--backend-store-uri postgresql://" in " ".join(services["mlflow"]["command"].split())
    runner = " ".join(services["runner"]["command"].split())
    for path in ("pipelines/prepare.py", "pipelines/iterate.py", "configs/cluster/address.yaml"):
        assert path in runner and (REPO / path).is_file()
    assert services["runner"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_dockerfile_builds_both_variants_from_the_pinned_pair():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "torch==2.14.1 torchvision==0.29.1" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "\"torch==2.14.1; platform_machine == 'x86_64'\"" in pyproject  # the image's +cpu pair satisfies the pin
    for copied in ("noisystudent", "pipelines", "configs", "infra"):
        assert f"COPY {copied} " in text and (REPO / copied).is_dir()


def _kubernetes_model_problems(obj, model: str) -> list[str]:
    """What the Kubernetes client's own model ``model`` refuses or drops in ``obj``: a missing
    required field raises; an unknown field is dropped and a value of the wrong type converted
    (each shows as a difference once parsed and written back); every resource quantity must parse."""
    import json

    from kubernetes.client import ApiClient
    from kubernetes.utils import parse_quantity

    class Reply:
        data = json.dumps(obj)

    api = ApiClient()
    back = api.sanitize_for_serialization(api.deserialize(Reply(), model))
    problems = []

    def compare(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a.keys() | b.keys():
                compare(a.get(k), b.get(k), f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{i}]")
        elif a != b:
            problems.append(f"{where}: {a!r} -> {b!r}")

    compare(obj, back, model)
    for container in obj.get("containers", []) if model == "V1PodSpec" else []:
        for kind, values in container.get("resources", {}).items():
            for name, quantity in values.items():
                try:
                    parse_quantity(quantity)
                except ValueError:
                    problems.append(f"{container['name']}.resources.{kind}.{name}: {quantity!r} is not a quantity")
    return problems


def _dask_cluster_problems(cluster: dict) -> list[str]:
    """The DaskCluster resource against the operator's own CRD (the keys it declares) and its pod
    and service specs against the Kubernetes client's models, as the CRD says they are."""
    import dask_kubernetes

    templates = yaml.safe_load(
        (Path(dask_kubernetes.__file__).parent / "operator" / "customresources" / "templates.yaml").read_text()
    )["definitions"]
    problems = []
    for where, obj, schema in [
        ("spec", cluster["spec"], templates["dask.k8s.api.v1.DaskCluster"]["properties"]["spec"]),
        ("spec.scheduler", cluster["spec"]["scheduler"], templates["dask.k8s.api.v1.DaskScheduler"]),
        ("spec.worker", cluster["spec"]["worker"], templates["dask.k8s.api.v1.DaskWorker"]),
    ]:
        problems += [f"{where}.{k}: not in the CRD" for k in set(obj) - set(schema["properties"])]
        problems += [f"{where}.{k}: required by the CRD" for k in set(schema.get("required", [])) - set(obj)]
    problems += _kubernetes_model_problems(cluster["spec"]["worker"]["spec"], "V1PodSpec")
    problems += _kubernetes_model_problems(cluster["spec"]["scheduler"]["spec"], "V1PodSpec")
    problems += _kubernetes_model_problems(cluster["spec"]["scheduler"]["service"], "V1ServiceSpec")
    return problems


@pytest.mark.parametrize(
    "overlay, settings",
    [
        ("kubernetes-gpu.yaml", {}),
        (None, {"kind": "kubernetes", "memory_limit": "6GB", "threads_per_worker": 3}),
        (
            None,
            {"kind": "kubernetes", "memory_limit": "1536MiB", "kubernetes.pvc": "shards", "kubernetes.namespace": "ml"},
        ),
    ],
)
def test_the_rendered_dask_cluster_is_valid_for_the_operator_and_the_kubernetes_client(overlay, settings):
    """No cluster here to apply it to (kind and k3d need a container runtime): the rendered
    resource is checked against the models a real API server's client would use."""
    from noisystudent.labeling.cluster import kubernetes_cluster_spec

    overlays = [REPO / "configs" / "cluster" / overlay] if overlay else []
    overrides = [f"cluster.{k}={v}" for k, v in settings.items()]
    cfg = load_config(REPO / "configs" / "imagenet.yaml", overrides=overrides, overlays=overlays)
    assert _dask_cluster_problems(kubernetes_cluster_spec(cfg.cluster)) == []


def test_the_kubernetes_manifests_are_valid_for_the_kubernetes_client():
    models = {"ServiceAccount": "V1ServiceAccount", "Role": "V1Role", "RoleBinding": "V1RoleBinding", "Job": "V1Job"}
    for f in sorted((REPO / "infra" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc["kind"] == "DaskCluster":
                assert _dask_cluster_problems(doc) == [], f.name
            else:
                assert _kubernetes_model_problems(doc, models[doc["kind"]]) == [], f.name
