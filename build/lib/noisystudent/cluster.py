"""The Dask cluster factory used by the pseudo-labeling stage."""
from __future__ import annotations

import contextlib
from typing import Iterator

from .config import ClusterConfig


class ClusterError(RuntimeError):
    pass


@contextlib.contextmanager
def create_client(cfg: ClusterConfig) -> Iterator["distributed.Client"]:  # noqa: F821
    """A connected ``distributed.Client``: a fresh LocalCluster, or a running scheduler by address."""
    from distributed import Client, LocalCluster

    if cfg.kind == "address":
        try:
            client = Client(cfg.address, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach Dask scheduler at {cfg.address} (config key 'cluster.address'): {exc}") from exc
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        memory_limit=cfg.memory_limit,
        dashboard_address=cfg.dashboard_address,
        host="127.0.0.1",
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
