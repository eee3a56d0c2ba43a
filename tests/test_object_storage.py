"""Object storage end to end, against real servers on 127.0.0.1: an S3-compatible one (moto in
server mode) and a plain static file server (``python -m http.server``). Our code reaches them
through fsspec as it would reach AWS or a CDN; nothing of ours is mocked."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3  # s3fs, boto3, moto[server], gcsfs and gcp-storage-emulator are in [dev]
import numpy as np
import pytest
from conftest import REPO, dask_processes, run_script, script_command, smoke_overrides, wait_for_http

from noisystudent import storage
from noisystudent.data.label_index import read_feature_rows, read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.shard_io import encode_png, expand_urls, iter_samples, write_shard
from noisystudent.errors import ShardError, StorageError
from noisystudent.models import ModelSpec, create_model, save_model

#: The secret key the tests give the S3 client: it must appear in no output, log or MLflow record.
SECRET = "nsTestSecret-7f3c9a1e5b2d4c6e8a0f"
pytestmark = pytest.mark.xdist_group("object-storage")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str
    env: dict  # the full environment a child process needs: credentials and endpoint
    client: object  # boto3 client: the test's own view of the bucket, independent of our code

    def keys(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o for page in pages for o in page.get("Contents", [])}

    def unfinished_uploads(self, bucket: str) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture(scope="module")
def s3():
    import s3fs

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    creds = {
        "AWS_ACCESS_KEY_ID": "noisystudent-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # the usual environment: s3fs, boto3 and MLflow read it themselves
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert wait_for_http(endpoint, proc, 60), "moto server did not start"
        client = boto3.client("s3", endpoint_url=endpoint)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        yield S3(endpoint, env, client)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()


def _upload_dir(s3: S3, local: Path, bucket: str, prefix: str) -> list[str]:
    s3.client.create_bucket(Bucket=bucket)
    for p in sorted(local.iterdir()):
        s3.client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return [f"s3://{bucket}/{prefix}/{p.name}" for p in sorted(local.iterdir())]


def _no_secret_in(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_s3_round_trip_bucket_to_bucket_student_trains_from_it_and_a_rerun_reuses_it(smoke_data, s3, tmp_path):
    """Shards in a bucket are labeled into a bucket, the student trains from there, the analysis
    and MLflow artifacts land in buckets too, a rerun reuses every finished shard, and the
    credentials appear nowhere."""
    inputs = _upload_dir(s3, smoke_data / "unlabeled", "corpus", "fmnist")
    for bucket in ("labels", "mlflow"):
        s3.client.create_bucket(Bucket=bucket)
    run = tmp_path / "run"
    remote = [
        "data.unlabeled_shards=s3://corpus/fmnist/shard-*.tar",
        "pseudo_label.cache_dir=s3://labels/cache",
        "tracking.artifact_location=s3://mlflow/artifacts",
    ]
    # data.num_workers=1: the student's pseudo-labels are read by a forked DataLoader worker
    r = run_script(
        "iterate.py",
        "--generations",
        "1",
        env=s3.env,
        overrides=[*smoke_overrides(smoke_data, run), *remote, "data.num_workers=1"],
    )

    manifest = LabelManifest.load(run / "gen-1" / "labels")
    assert [s.input for s in manifest.shards] == inputs
    outputs = manifest.outputs
    assert all(o.startswith("s3://labels/cache/teacher-") for o in outputs)
    assert manifest.shards_labeled + manifest.shards_reused == 4  # the teacher's analysis may label first
    local_samples = sum(1 for p in sorted((smoke_data / "unlabeled").glob("*.tar")) for _ in iter_samples(str(p)))
    assert manifest.total_samples == local_samples and manifest.skipped.total == 0
    in_bucket = s3.keys("labels", "cache/")
    for out in outputs:  # every sidecar, published beside its shard: labeling's and the analysis'
        stem = out[len("s3://labels/") : -len(".tar")]
        assert {f"{stem}{ext}" for ext in (".tar", ".index.npz", ".features.npy", ".summary.json", ".ood.npz")} <= set(
            in_bucket
        )
    assert not list(run.rglob("*.tar")), "label shards must live only in the bucket"
    # the student trained on labeled + pseudo-labeled images read from the bucket
    selection = next((run / "gen-1").rglob("selection.json"))
    chosen = json.loads(selection.read_text())
    assert chosen["shards"] == outputs and chosen["kept_unique"] > 0
    result = json.loads((run / "gen-1" / "student" / "result.json").read_text())
    assert np.isfinite(result["history"][-1]["train_pseudo_loss"]) and result["history"][-1]["train_pseudo_loss"] > 0
    assert (run / "gen-1" / "analysis" / "summary.json").is_file()
    # MLflow's artifacts (models, plots, the report) went to the artifact bucket, not the run dir
    artifacts = s3.keys("mlflow", "artifacts/")
    assert any(k.endswith("model.pt") for k in artifacts) and not (run / "mlartifacts").exists()
    # a rerun with the same teacher (another run directory) labels nothing: every shard is reused
    before = {k: v["ETag"] for k, v in s3.keys("labels", "cache/").items()}
    rerun = run_script(
        "pseudo_label.py",
        "--teacher",
        str(run / "gen-0" / "teacher" / "model.pt"),
        "--out",
        str(tmp_path / "rerun"),
        env=s3.env,
        overrides=[*smoke_overrides(smoke_data, tmp_path / "rerun-run"), *remote, "tracking.enabled=false"],
    )
    again = LabelManifest.load(tmp_path / "rerun")
    assert again.shards_reused == 4 and again.shards_labeled == 0 and again.outputs == outputs
    assert {k: v["ETag"] for k, v in s3.keys("labels", "cache/").items()} == before  # nothing rewritten
    # the credentials: in no file of the run (config, MLflow store, logs), no object, no output line
    assert _no_secret_in(run) == [] and _no_secret_in(tmp_path / "rerun") == []
    for bucket in ("labels", "mlflow"):
        for key in s3.keys(bucket):
            assert SECRET.encode() not in s3.client.get_object(Bucket=bucket, Key=key)["Body"].read(), key
    assert SECRET not in r.stdout + r.stderr + rerun.stdout + rerun.stderr


def _big_shard(path: Path, n: int, side: int) -> list[str]:
    """Random-noise RGB PNGs (incompressible: about side*side*3 bytes each), unique keys."""
    rng = np.random.default_rng(0)
    keys = [f"noise{i:04d}" for i in range(n)]
    write_shard(
        path, ({"__key__": k, "png": encode_png(rng.integers(0, 255, (side, side, 3), np.uint8))} for k in keys)
    )
    return keys


def test_a_worker_killed_mid_upload_leaves_no_partial_object_and_the_retry_publishes_a_whole_one(s3, tmp_path):
    """A real Dask worker SIGKILLed while its label shard's multipart upload is in flight: no
    object appears, the retried task publishes a complete shard, and the unfinished upload is aborted."""
    from distributed import Client

    s3.client.create_bucket(Bucket="big-in")
    s3.client.create_bucket(Bucket="big-out")
    keys = _big_shard(tmp_path / "big-000.tar", 400, 256)  # ~79 MB: five multipart parts
    s3.client.upload_file(str(tmp_path / "big-000.tar"), "big-in", "big-000.tar")
    spec = ModelSpec("test_resnet", 4, 3, 32, [f"c{i}" for i in range(4)], [0.5] * 3, [0.25] * 3)
    save_model(tmp_path / "teacher.pt", create_model(spec).eval(), spec)
    with dask_processes(tmp_path, ("uploader",), s3.env, nanny=True) as (address, _procs):
        with Client(address, timeout="30s") as monitor:
            monitor.wait_for_workers(1, timeout=120)
            cmd = script_command(
                "pseudo_label.py",
                "--teacher",
                str(tmp_path / "teacher.pt"),
                "--shards",
                "s3://big-in/big-000.tar",
                "--out",
                str(tmp_path / "labels"),
                "--scheduler",
                address,
                overrides=[
                    "tracking.enabled=false",
                    "data.channels=3",
                    "data.mean=[0.5]",
                    "data.std=[0.25]",
                    "pseudo_label.cache_dir=s3://big-out/cache",
                    "pseudo_label.save_features=false",
                    "cluster.task_retries=2",
                ],
            )
            job = subprocess.Popen(cmd, cwd=REPO, env=s3.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 240
            while not s3.unfinished_uploads("big-out"):
                assert time.time() < deadline and job.poll() is None, "no upload was seen in flight"
                time.sleep(0.005)
            (pid,) = monitor.run(os.getpid).values()
            os.kill(pid, signal.SIGKILL)  # the worker, mid-upload
            in_flight = s3.unfinished_uploads("big-out")
            visible = list(s3.keys("big-out"))
            stdout, stderr = job.communicate(timeout=600)
    assert in_flight, "the kill came after the upload finished"
    assert visible == [], f"a killed upload left visible objects: {visible}"
    assert job.returncode == 0, stderr[-3000:]
    manifest = LabelManifest.load(tmp_path / "labels")
    (shard,) = manifest.shards
    assert read_index(shard.output).keys.tolist() == keys  # whole: every sample, once, in order
    assert [s["__key__"] for s in iter_samples(shard.output)] == keys
    assert s3.unfinished_uploads("big-out") == [] and manifest.stale_temporaries_removed >= 1


def test_feature_rows_read_by_range_from_a_bucket_equal_the_local_file(s3, tmp_path):
    s3.client.create_bucket(Bucket="feats")
    feats = np.random.default_rng(1).normal(size=(300, 24)).astype(np.float16)
    np.save(tmp_path / "a.features.npy", feats)
    storage.write_bytes("s3://feats/x/a.features.npy", (tmp_path / "a.features.npy").read_bytes())
    rows = [299, 0, 17, 17, 150]
    assert np.array_equal(read_feature_rows("s3://feats/x/a.tar", rows), feats[rows].astype(np.float32))
    assert np.array_equal(read_feature_rows(str(tmp_path / "a.tar"), rows), feats[rows].astype(np.float32))


def test_http_corpus_is_read_by_streaming_and_http_outputs_are_refused(smoke_data, tmp_path):
    """`python -m http.server` has no range requests and no listing API: shards are named by a
    brace pattern and streamed once, gzip included; writing to http is one clear error."""
    from noisystudent.config import ClusterConfig, DataConfig
    from noisystudent.labeling.cluster import ClusterSession
    from noisystudent.labeling.corpus import label_corpus
    from noisystudent.labeling.job import LabelingJob

    served = tmp_path / "www"
    served.mkdir()
    local = sorted((smoke_data / "unlabeled").glob("shard-*.tar"))[:2]
    for p in local:
        (served / p.name).write_bytes(p.read_bytes())
    (served / "extra.tar.gz").write_bytes(gzip.compress(local[0].read_bytes()))
    with _http_server(served) as base:
        urls = expand_urls(f"{base}/shard-{{000000..000001}}.tar") + [f"{base}/extra.tar.gz"]
        assert [storage.basename(u) for u in urls] == [local[0].name, local[1].name, "extra.tar.gz"]
        expected = [[s["__key__"] for s in iter_samples(str(p))] for p in (*local, local[0])]
        assert [[s["__key__"] for s in iter_samples(u)] for u in urls] == expected
        spec = ModelSpec("test_resnet", 10, 1, 28, [str(c) for c in range(10)], [0.286], [0.353])
        save_model(tmp_path / "t.pt", create_model(spec).eval(), spec)
        data = DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353])
        job = LabelingJob.for_checkpoint(tmp_path / "t.pt", data)
        with ClusterSession(ClusterConfig(n_workers=1)) as cluster:
            first = label_corpus(job, urls, tmp_path / "labels", cluster, show_progress=False)
            assert [read_index(s.output).keys.tolist() for s in first.shards] == expected
            assert all("Last-Modified" in s.input_identity for s in first.shards)
            again = label_corpus(job, urls, tmp_path / "labels", cluster, show_progress=False)
        assert again.shards_reused == 3  # the identity (size, Last-Modified) is stable
        with pytest.raises(StorageError, match="read-only"):
            storage.write_bytes(f"{base}/new.tar", b"x")
        with pytest.raises(StorageError, match="no such object"):
            list(iter_samples(f"{base}/missing.tar"))


@contextlib.contextmanager
def _http_server(served: Path, log=subprocess.DEVNULL):
    """``python -m http.server`` on ``served``; yields its base URL (request lines go to ``log``)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
        cwd=served,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_http(base, proc, 60)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_remote_shard_that_is_not_a_tar_fails_the_pass_once_without_retries(smoke_data, tmp_path):
    """Random bytes named .tar on a server cannot be checked before labeling (no request per shard):
    the task reads it once, and the pass fails with one line naming it. Before, it was counted as a
    cut shard with 0 samples lost and an empty output written; raised, it would be fetched again by
    each of the task's retries."""
    from noisystudent.config import ClusterConfig, DataConfig
    from noisystudent.labeling.cluster import ClusterSession
    from noisystudent.labeling.corpus import label_corpus
    from noisystudent.labeling.job import LabelingJob

    served = tmp_path / "www"
    served.mkdir()
    (served / "junk.tar").write_bytes(np.random.default_rng(0).bytes(20_000))
    spec = ModelSpec("test_resnet", 10, 1, 28, [str(c) for c in range(10)], [0.286], [0.353])
    save_model(tmp_path / "t.pt", create_model(spec).eval(), spec)
    job = LabelingJob.for_checkpoint(
        tmp_path / "t.pt", DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353])
    )
    log = tmp_path / "requests.log"
    with log.open("w") as fh, _http_server(served, fh) as base:
        with ClusterSession(ClusterConfig(n_workers=1, task_retries=5, reuse=True)) as cluster:
            with pytest.raises(ShardError) as err:
                label_corpus(job, [f"{base}/junk.tar"], tmp_path / "labels", cluster, show_progress=False)
            with cluster.client() as client:  # a worker's death is retried as often as a raised error
                assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 5
    assert (
        str(err.value) == f"shard {base}/junk.tar is not a tar file (no tar header in it): check data.unlabeled_shards"
    )
    assert log.read_text().count('"GET /junk.tar') == 1, log.read_text()
    assert not list((tmp_path / "labels").glob("*.tar"))  # no empty output


def test_missing_objects_and_an_unreachable_server_get_one_clear_line(s3):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x\.tar: no such object"):
        list(iter_samples("s3://no-such-bucket-here/x.tar"))
    with pytest.raises(ShardError, match="no shards match"):
        expand_urls("s3://no-such-bucket-here/shard-*.tar")
    # a server that is not there, asked from a child process (the endpoint comes from the environment)
    code = (
        "import sys; from noisystudent import storage\n"
        "try:\n    storage.info(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(3)"
    )
    env = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code, "s3://corpus/x.tar"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    (line,) = r.stdout.strip().splitlines()
    assert line.startswith("StorageError s3://corpus/x.tar: ") and "reachable" in line and SECRET not in line


def _gcs_api(host: str, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
    """The GCS JSON API, spoken directly (the test's own view, independent of gcsfs and of our code)."""
    import urllib.request

    req = urllib.request.Request(host + path, data=body, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = resp.read()
    return json.loads(data) if resp.headers.get_content_type() == "application/json" and data else data


def test_gcs_labels_bucket_to_bucket_and_a_rerun_reuses_every_shard(smoke_data, tmp_path):
    """gs:// through gcsfs against a GCS emulator on 127.0.0.1 (gcp-storage-emulator)."""
    import shutil
    import urllib.parse

    port = _free_port()
    emulator = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    # the emulator speaks only the JSON API: gcsfs' gRPC bucket-type probe (for zonal buckets) is switched off
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STORAGE_EMULATOR_HOST": host,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    try:
        assert wait_for_http(host, proc, 60), "GCS emulator did not start"
        for bucket in ("gcs-in", "gcs-out"):
            _gcs_api(host, "POST", "/storage/v1/b?project=test", json.dumps({"name": bucket}).encode())
        local = sorted((smoke_data / "unlabeled").glob("shard-*.tar"))
        for p in local:
            _gcs_api(
                host,
                "POST",
                f"/upload/storage/v1/b/gcs-in/o?uploadType=media&name=corpus/{p.name}",
                p.read_bytes(),
                "application/x-tar",
            )
        spec = ModelSpec("test_resnet", 10, 1, 28, [str(c) for c in range(10)], [0.286], [0.353])
        save_model(tmp_path / "t.pt", create_model(spec).eval(), spec)
        remote = [
            "data.unlabeled_shards=gs://gcs-in/corpus/shard-*.tar",
            "pseudo_label.cache_dir=gs://gcs-out/cache",
            "tracking.enabled=false",
        ]
        label = ("pseudo_label.py", "--teacher", str(tmp_path / "t.pt"))
        run_script(
            *label,
            "--out",
            str(tmp_path / "first"),
            env=env,
            overrides=[*smoke_overrides(smoke_data, tmp_path / "r"), *remote],
        )
        run_script(
            *label,
            "--out",
            str(tmp_path / "again"),
            env=env,
            overrides=[*smoke_overrides(smoke_data, tmp_path / "r"), *remote],
        )
        first, again = (LabelManifest.load(tmp_path / d) for d in ("first", "again"))
        assert first.shards_labeled == 4 and again.shards_reused == 4 and again.shards_labeled == 0
        assert all("generation" in s.input_identity for s in first.shards)
        listed = {o["name"] for o in _gcs_api(host, "GET", "/storage/v1/b/gcs-out/o")["items"]}
        for p, shard in zip(local, first.shards):
            name = shard.output[len("gs://gcs-out/") :]
            assert {name, name[:-4] + ".index.npz", name[:-4] + ".features.npy", name[:-4] + ".summary.json"} <= listed
            copy = tmp_path / Path(name).name
            copy.write_bytes(
                _gcs_api(host, "GET", f"/download/storage/v1/b/gcs-out/o/{urllib.parse.quote(name, safe='')}?alt=media")
            )
            assert [s["__key__"] for s in iter_samples(str(copy))] == [s["__key__"] for s in iter_samples(str(p))]
    finally:
        proc.kill()
        proc.wait(timeout=30)
