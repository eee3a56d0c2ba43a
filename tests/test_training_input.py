"""What the training loaders hand the device: uint8 pixels normalised there to the very numbers the
host computed before, loader workers shared by images per step and by ranks per node, one OpenCV
thread per worker."""

from __future__ import annotations

import os

import cv2
import pytest
import torch
from conftest import REPO, smoke_overrides

from noisystudent.config import AugmentConfig, TrainConfig, load_config
from noisystudent.data.imagefolder import LabeledImages, load_labeled_data
from noisystudent.data.sampler import BatchReader
from noisystudent.engine.batches import BatchSource, split_loader_workers
from noisystudent.engine.distributed import DistEnv
from noisystudent.noise import create_train_transform
from noisystudent.seeds import Seeds

CPU = torch.device("cpu")


def _labeled(smoke_data, tmp_path) -> tuple[LabeledImages, TrainConfig]:
    data = load_config(REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, tmp_path)).data
    noise = AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5)  # the student's noise, RandAugment included
    images = load_labeled_data(data).train.with_transform(create_train_transform(data, noise, seed=5))
    return images, TrainConfig(epochs=1, batch_size=10, augment=noise)


def _source(recipe, images, num_workers=0) -> BatchSource:
    return BatchSource(
        recipe, images, None, seeds=Seeds(0), num_workers=num_workers, channels_last=False, device=CPU, env=DistEnv()
    )


def test_uint8_crosses_the_copy_and_the_device_normalises_to_the_hosts_numbers(smoke_data, tmp_path):
    images, recipe = _labeled(smoke_data, tmp_path)
    batches = _source(recipe, images)
    request = next(iter(batches.labeled_loader.batch_sampler))
    uint8, _ = batches.labeled_loader.collate_fn(batches.labeled_loader.dataset.__getitems__(request))
    assert uint8.dtype == torch.uint8  # a quarter of float32's bytes to copy
    x = next(batches.epoch(0)).images
    # the float32 tensors the loader used to copy: the same noise (same batch seed), normalised on the host
    host = torch.stack([sample[0] for sample in BatchReader(images).__getitems__(request)])
    assert x.dtype == torch.float32 and torch.equal(x, host)


class _ThreadCheckingImages(LabeledImages):
    """The real dataset, refusing to decode in a worker whose OpenCV would start a thread per core."""

    def image(self, i):
        if torch.utils.data.get_worker_info() is not None and cv2.getNumThreads() != 1:
            raise RuntimeError(f"loader worker decodes with {cv2.getNumThreads()} OpenCV threads")
        return super().image(i)


def test_each_loader_worker_decodes_with_one_opencv_thread(smoke_data, tmp_path):
    images, recipe = _labeled(smoke_data, tmp_path)
    checking = object.__new__(_ThreadCheckingImages)
    checking.__dict__.update(images.__dict__)
    cv2.setNumThreads(2)  # what a worker inherits from a parent that uses OpenCV's default on 2+ cores
    batches = _source(recipe, checking, num_workers=1)
    assert sum(1 for _ in batches.epoch(0)) == batches.steps_per_epoch


def test_loader_workers_are_shared_by_images_per_step_and_by_ranks_per_node(monkeypatch):
    gpu = torch.device("cuda")  # only its type is read: no GPU needed
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    # one rank on a 64-core node: every core but the one driving the GPU (not a cap of 8)
    assert split_loader_workers(-1, gpu, 64, 0) == (63, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    # 4 ranks share the node: 15 workers each; a student reads 3 pseudo-labeled images per labeled one
    labeled, pseudo = split_loader_workers(-1, gpu, 64, 192)
    assert (labeled, pseudo) == (4, 11) and labeled + pseudo == 64 // 4 - 1
    assert split_loader_workers(-1, gpu, 64, 64) == (8, 7)
    assert split_loader_workers(3, gpu, 64, 192) == (3, 3)  # an explicit data.num_workers is per loader
    assert split_loader_workers(3, gpu, 64, 0) == (3, 0)  # a teacher has no pseudo-label loader


@pytest.fixture(autouse=True)
def _restore_opencv_threads():
    threads = cv2.getNumThreads()
    yield
    cv2.setNumThreads(threads)
