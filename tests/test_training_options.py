"""Optional training paths: EMA of the weights, labeled-only fine-tune, torch.compile, bf16 autocast
on CPU. Each trains a real (tiny) timm model on in-memory images."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from noisystudent.config import AugmentConfig, Config, TrainConfig
from noisystudent.data.imagefolder import LabeledImages
from noisystudent.models import load_checkpoint
from noisystudent.noise import create_eval_transform, create_train_transform
from noisystudent.engine.train import train_model

STAGE = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0.0, augment=AugmentConfig(num_ops=1, magnitude=4))


def _data(cfg: Config, n: int = 96) -> tuple[LabeledImages, LabeledImages]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(n)]
    targets = [i % 4 for i in range(n)]
    for img, t in zip(images, targets):  # learnable: class = which quadrant is bright
        img[(t // 2) * 8:(t // 2) * 8 + 8, (t % 2) * 8:(t % 2) * 8 + 8] = 255
    names = [str(c) for c in range(4)]
    train = LabeledImages.from_arrays(images, targets, names, create_train_transform(cfg.data, STAGE.augment, seed=0))
    return train, train.with_transform(create_eval_transform(cfg.data))


def _cfg(**changes) -> Config:
    cfg = Config()
    cfg.data = replace(cfg.data, image_size=16, num_workers=0)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _weights(path) -> dict:
    return load_checkpoint(path)["model"]


def test_ema_weights_are_the_ones_validated_and_handed_on(tmp_path):
    cfg = _cfg(amp="off")
    train, val = _data(cfg)
    raw = train_model(STAGE, cfg, "resnet10t", tmp_path / "raw", train, val)
    ema = train_model(replace(STAGE, ema_decay=0.9), cfg, "resnet10t", tmp_path / "ema", train, val)
    a, b = _weights(raw.model_path), _weights(ema.model_path)
    # EMA does not change the training trajectory (same seed), only what is saved: an average of
    # the recent weights, close to but not equal to the raw final weights
    differs = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert differs, "the EMA run saved the raw weights"
    k = "fc.weight"
    assert torch.norm(a[k] - b[k]) < 0.5 * torch.norm(a[k])
    assert ema.history[-1]["val_top1"] != raw.history[-1]["val_top1"] or \
        ema.history[-1]["val_loss"] != raw.history[-1]["val_loss"]  # validation ran on the EMA model


def test_compiled_training_writes_plain_checkpoints(tmp_path):
    cfg = _cfg(amp="off", compile=True)
    train, val = _data(cfg)
    result = train_model(replace(STAGE, epochs=1), cfg, "resnet10t", tmp_path / "c", train, val)
    keys = list(_weights(result.model_path))
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)  # loads into an uncompiled model
    assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.skipif(not __import__("noisystudent.engine.precision", fromlist=["x"]).cpu_has_native_bf16(),
                    reason="CPU without native bf16")
def test_bf16_autocast_on_cpu_learns(tmp_path):
    cfg = _cfg(amp="bf16")
    train, val = _data(cfg)
    result = train_model(replace(STAGE, epochs=4), cfg, "resnet10t", tmp_path / "b", train, val)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_top1"] > 0.5  # 4 classes: chance is 0.25
    assert all(v.dtype == torch.float32 for v in _weights(result.model_path).values() if v.is_floating_point())


def test_num_workers_auto_leaves_the_cores_to_the_train_step_on_cpu():
    from noisystudent.config import ConfigError, load_config
    from noisystudent.engine.device import resolve_num_workers

    cpu = torch.device("cpu")
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # torch's threads take every core: a worker would only steal one
        assert resolve_num_workers(-1, cpu) == 0
        if cores >= 2:
            torch.set_num_threads(1)  # a free core: auto uses it
            assert 1 <= resolve_num_workers(-1, cpu) <= min(8, cores - 1)
    finally:
        torch.set_num_threads(threads)
    assert resolve_num_workers(3, cpu) == 3  # an explicit count is kept
    assert load_config(None).data.num_workers == -1
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, ["data.num_workers=-2"])
