"""A labeling job: which teacher labels the corpus, how its inputs are prepared and how it infers,
and the label-cache directory those settings key.

Outputs are cached: a labeled shard lives under
``<pseudo_label.cache_dir>/teacher-<sha256[:16]>-pre-<preprocessing hash>/`` and records the
identity (path, size, mtime) of the input it came from, so any later run or experiment with the
same teacher checkpoint and preprocessing reuses it, and a changed input is relabeled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import storage
from ..config import DataConfig
from ..data.batch_decode import device_jpeg_decoder_available
from ..data.label_index import INDEX_VERSION, shard_stem
from ..data.label_manifest import TeacherRef
from ..errors import ConfigError
from ..io import sha256_file, sha256_json


@dataclass(frozen=True)
class LabelingJob:
    """Everything a labeling task needs besides its shard; sent once to every worker."""

    checkpoint: str  # absolute path of the teacher's model.pt
    sha256: str  # its content hash: the cache key's teacher part
    data: DataConfig
    batch_size: int = 512
    device: str = "cpu"
    amp: str = "off"
    threads: int = 0  # torch threads per worker (0: torch's default)
    tta_hflip: bool = False  # average each label with the mirrored view's
    save_features: bool = False  # also write the pooled features (the analysis reads them)
    channels_last: bool = False
    cache_dir: str = ""  # label cache root ("": write the shards beside the manifest)
    teacher_run_id: str = ""
    decode: str = "cpu"  # cpu: PIL/OpenCV on the host; gpu: batched decode_jpeg and the geometry on `device`
    prefetch_batches: int = 2  # batches a background thread prepares ahead of inference (0: none, no thread)

    def __post_init__(self) -> None:
        if self.decode not in ("cpu", "gpu"):  # "auto" is resolved for a device first: resolve_decode
            raise ValueError(f"LabelingJob.decode must be cpu or gpu, got {self.decode!r}")

    @classmethod
    def for_checkpoint(cls, checkpoint: str | os.PathLike, data: DataConfig, **settings) -> LabelingJob:
        """A job for ``checkpoint`` (resolved to an absolute path and hashed once, here)."""
        path = str(Path(checkpoint).resolve())
        return cls(checkpoint=path, sha256=sha256_file(path), data=data, **settings)

    @property
    def teacher_id(self) -> str:
        """What each pseudo-labeled sample records as its teacher."""
        return self.sha256[:16]

    @property
    def teacher(self) -> TeacherRef:
        return TeacherRef(self.checkpoint, self.sha256, self.teacher_run_id)

    def preprocessing_key(self) -> dict:
        """Everything besides the teacher that changes the outputs; part of the cache key."""
        d = self.data
        return {
            "image_size": d.image_size,
            "channels": d.channels,
            "mean": list(d.mean),
            "std": list(d.std),
            "tta_hflip": self.tta_hflip,
            "index_version": INDEX_VERSION,
            "features": self.save_features,
            # only where it changes the labels: the cpu path's caches keep their key
            **({"decode": self.decode} if self.decode != "cpu" else {}),
        }

    def shard_dir(self, out_dir: str | os.PathLike) -> str:
        """``<cache_dir>/teacher-<sha>-pre-<key>`` (a local directory or an object-store prefix), or
        ``out_dir`` without a cache."""
        if not self.cache_dir:
            return str(out_dir)
        key = sha256_json(self.preprocessing_key())[:8]
        return storage.join(storage.resolve(self.cache_dir), f"teacher-{self.sha256[:16]}-pre-{key}")


def output_name(input_url: str) -> str:
    """``<stem>-<hash of the input's directory>.tar``: readable, and distinct across corpora in one cache."""
    stem = shard_stem(storage.basename(input_url))
    where = sha256_json(
        storage.parent(input_url) if storage.is_url(input_url) else os.path.realpath(os.path.dirname(input_url) or ".")
    )[:8]
    return f"{stem}-{where}.tar"


def resolve_decode(setting: str, device: str) -> str:
    """``pseudo_label.decode`` for a job on ``device``: auto becomes gpu where the batched decoder
    runs on that CUDA device, else cpu; gpu where it cannot is refused."""
    cuda = torch.device(device).type == "cuda"
    if setting == "auto":
        return "gpu" if cuda and device_jpeg_decoder_available(device) else "cpu"
    if setting == "gpu" and not device_jpeg_decoder_available(device):
        raise ConfigError(
            f"pseudo_label.decode=gpu needs torchvision's decode_jpeg on {device} (a CUDA build of torchvision); "
            "use decode=auto or cpu"
        )
    return setting
