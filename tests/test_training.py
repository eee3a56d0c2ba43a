"""Optional training paths: EMA of the weights, labeled-only fine-tune, torch.compile, bf16 autocast
on CPU, and the guard against non-finite steps. Each trains a real (tiny) timm model on in-memory
images."""

from __future__ import annotations

import os
from copy import deepcopy
from dataclasses import replace

import numpy as np
import pytest
import torch

from noisystudent.config import AugmentConfig, Config, ConfigError, TrainConfig, load_config
from noisystudent.data.geometry import create_eval_transform
from noisystudent.data.imagefolder import LabeledImages
from noisystudent.engine.precision import keep_fp32_where_cpu_bf16_fails, resolve_amp
from noisystudent.engine.train import TrainingJob, train_model
from noisystudent.errors import NonFiniteTrainingError
from noisystudent.models import load_checkpoint
from noisystudent.noise import create_train_transform

# No horizontal flips: the label is which quadrant is bright, and a flip swaps left and right, which
# caps what any model can reach at 0.5 (the bf16 tests' bar); with flips they passed by the seed's luck.
STAGE = TrainConfig(
    epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0.0, augment=AugmentConfig(num_ops=1, magnitude=4, hflip=0.0)
)


def _data(cfg: Config, n: int = 96) -> tuple[LabeledImages, LabeledImages]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(n)]
    targets = [i % 4 for i in range(n)]
    for img, t in zip(images, targets):  # learnable: class = which quadrant is bright
        img[(t // 2) * 8 : (t // 2) * 8 + 8, (t % 2) * 8 : (t % 2) * 8 + 8] = 255
    names = [str(c) for c in range(4)]
    train = LabeledImages.from_arrays(images, targets, names, create_train_transform(cfg.data, STAGE.augment, seed=0))
    return train, train.with_transform(create_eval_transform(cfg.data))


def _cfg(**changes) -> Config:
    cfg = Config()
    cfg.data = replace(cfg.data, image_size=16, num_workers=0, channels=1, mean=[0.286], std=[0.353])
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _weights(path) -> dict:
    return load_checkpoint(path)["model"]


def test_ema_weights_are_the_ones_validated_and_handed_on(tmp_path):
    cfg = _cfg(amp="off")
    train, val = _data(cfg)
    raw = train_model(TrainingJob(STAGE, "resnet10t", tmp_path / "raw", train, val), cfg)
    ema = train_model(TrainingJob(replace(STAGE, ema_decay=0.9), "resnet10t", tmp_path / "ema", train, val), cfg)
    a, b = _weights(raw.model_path), _weights(ema.model_path)
    # EMA does not change the training trajectory (same seed), only what is saved: an average of
    # the recent weights, close to but not equal to the raw final weights
    differs = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert differs, "the EMA run saved the raw weights"
    k = "fc.weight"
    assert torch.norm(a[k] - b[k]) < 0.5 * torch.norm(a[k])
    assert (
        ema.history[-1]["val_top1"] != raw.history[-1]["val_top1"]
        or ema.history[-1]["val_loss"] != raw.history[-1]["val_loss"]
    )  # validation ran on the EMA model


def test_compiled_training_writes_plain_checkpoints(tmp_path):
    cfg = _cfg(amp="off", compile=True)
    train, val = _data(cfg)
    result = train_model(TrainingJob(replace(STAGE, epochs=1), "resnet10t", tmp_path / "c", train, val), cfg)
    keys = list(_weights(result.model_path))
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)  # loads into an uncompiled model
    assert np.isfinite(result.history[-1]["train_loss"])


def _learns_in_bf16(tmp_path, stage: TrainConfig) -> list[int]:
    """Trains in bf16; returns the skipped (non-finite) steps of each epoch."""
    cfg = _cfg(amp="bf16")
    train, val = _data(cfg)
    result = train_model(TrainingJob(stage, "resnet10t", tmp_path, train, val), cfg)
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < 0.6 * result.history[0]["train_loss"]  # it learns, not just drifts
    assert result.history[-1]["val_top1"] > 0.5  # 4 classes: chance is 0.25
    weights = _weights(result.model_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return [row["skipped_steps"] for row in result.history]


# bf16 autocast runs on every CPU (emulated where the CPU has no bf16 instructions, only slower).
# The settings below went NaN every time on a CPU with AMX before the non-finite guard existed.
BF16_NAN_SETTINGS = replace(STAGE, epochs=4, grad_clip=1.0, warmup_epochs=0.5)


def test_bf16_autocast_on_cpu_learns_with_clipping_and_short_warmup(tmp_path):
    # bf16 training learns. At 16 px resnet10t's layer4.0.conv1 (stride 2) sees a 1x1 map, whose bf16
    # weight gradient is garbage on AVX512-BF16 CPUs: the fix (keep_fp32_where_cpu_bf16_fails) is
    # guarded by the gradient test below and, strictly (zero skipped steps), by the slow test, since
    # bf16 kernels differ between CPU types. Without it 9 of these 24 steps are skipped here.
    skipped = _learns_in_bf16(tmp_path, BF16_NAN_SETTINGS)
    print("bf16 skipped steps per epoch:", skipped)  # kept in the log: > 0 means the guard caught a NaN


def _strided_conv_on_one_pixel() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 4)
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_stride_wider_than_its_input_gets_true_weight_gradients_under_cpu_bf16(channels_last):
    fp32, bf16 = _strided_conv_on_one_pixel(), _strided_conv_on_one_pixel()
    assert keep_fp32_where_cpu_bf16_fails(bf16) == 1  # the strided conv only
    ema_copy = deepcopy(bf16)  # the EMA's copy must run its own weights, not the original's
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for model in (fp32, bf16, ema_copy):
        model.to(memory_format=memory_format)
    for call in range(8):  # the kernel's garbage came on most calls, not all
        x = torch.randn(16, 32, 1, 1).contiguous(memory_format=memory_format)
        grads = []
        for model, amp in ((fp32, False), (bf16, True), (ema_copy, True)):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model(x).float().square().sum().backward()
            grads.append(model[0].weight.grad)
        for g in grads[1:]:  # bf16 rounding elsewhere: well under 5% of the largest entry (garbage was 1e13 and up)
            assert ((g - grads[0]).abs().max() / grads[0].abs().max()).item() < 0.05, f"call {call}"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a map as wide as the stride keeps bf16
        assert bf16[0](torch.randn(2, 32, 2, 2)).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(3))
def test_bf16_on_cpu_has_no_nonfinite_step_run_after_run_in_one_process(tmp_path, repeat):
    # the failure depended on what the process had run before: repeated, in one process, on both settings
    assert _learns_in_bf16(tmp_path / "clip", BF16_NAN_SETTINGS) == [0] * 4
    assert _learns_in_bf16(tmp_path / "plain", replace(STAGE, epochs=4)) == [0] * 4


class _Poisoned:
    """The real transform, except that it returns NaN images for ``nan_index`` and, once
    ``clean_calls`` images have been made, for every image: a non-finite loss without touching
    the training code."""

    def __init__(self, transform, nan_images: set[int], clean_calls: int | None = None):
        self.transform, self.nan_images, self.clean_calls, self.calls = transform, nan_images, clean_calls, 0

    def __call__(self, image):
        x = self.transform(image)
        self.calls += 1
        poisoned = int(image[0, 0]) in self.nan_images or (
            self.clean_calls is not None and self.calls > self.clean_calls
        )
        return torch.full_like(x, float("nan")) if poisoned else x


def _marked(cfg: Config, n: int = 96) -> tuple[LabeledImages, LabeledImages]:
    """``_data`` with each image's index in its top-left pixel (so a transform can recognise it)."""
    train, val = _data(cfg, n)
    for i, img in enumerate(train.images):
        img[0, 0] = i
    return train, val


def test_a_nonfinite_loss_skips_its_step_and_is_counted(tmp_path):
    cfg = _cfg(amp="off")
    train, val = _marked(cfg)
    train = train.with_transform(_Poisoned(create_eval_transform(cfg.data), nan_images={7}))
    result = train_model(TrainingJob(replace(STAGE, epochs=3), "resnet10t", tmp_path / "t", train, val), cfg)
    # 96 images, 6 steps of 16 per epoch: the poisoned image is in exactly one step of each epoch
    assert [row["skipped_steps"] for row in result.history] == [1, 1, 1]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)  # the skipped step is not in the mean
    weights = _weights(result.model_path)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())  # never updated with NaN
    assert result.history[-1]["val_top1"] > 0.25


def test_steps_that_stay_nonfinite_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(amp="off", max_nonfinite_steps=3)
    train, val = _marked(cfg)
    train = train.with_transform(_Poisoned(create_eval_transform(cfg.data), nan_images=set(), clean_calls=96))
    with pytest.raises(NonFiniteTrainingError, match=r"epoch 2 step 3: 3 step\(s\) in a row .*train_loss=nan"):
        train_model(TrainingJob(replace(STAGE, epochs=4), "resnet10t", tmp_path / "t", train, val), cfg)
    last = load_checkpoint(tmp_path / "t" / "last.pt")
    assert last["epoch"] == 1 and not (tmp_path / "t" / "result.json").exists()
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_fp16_on_cpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'amp'.*GPU"):
        load_config(None, ["amp=fp16", "device=cpu"])
    with pytest.raises(ConfigError, match="config key 'amp'"):  # device=auto that resolved to the CPU
        resolve_amp("fp16", torch.device("cpu"))
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"


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
