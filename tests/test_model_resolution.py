"""A model is evaluated at the resolution and normalisation it was trained with (stored in its
checkpoint), not the run's base ``data.image_size``: a ladder may change resolution per generation."""

from __future__ import annotations

import numpy as np
import torch
from conftest import stage_context

from noisystudent.data.geometry import create_eval_transform
from noisystudent.data.imagefolder import load_labeled_data
from noisystudent.engine.predict import eval_loader, predict
from noisystudent.models import ModelSpec, create_model, save_model
from noisystudent.stages.evaluate import evaluate_model


def _nll(model, split, data_cfg) -> float:
    probs, targets = predict(
        model,
        eval_loader(split.with_transform(create_eval_transform(data_cfg)), torch.device("cpu")),
        torch.device("cpu"),
    )
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())


def test_evaluation_uses_the_checkpoint_resolution(smoke_config, tmp_path):
    cfg = smoke_config()
    assert cfg.data.image_size == 28
    data = load_labeled_data(cfg.data)  # decoded once; every consumer picks its transform
    spec = ModelSpec(
        name=cfg.ladder[-1],
        num_classes=len(data.class_names),
        in_chans=cfg.data.channels,
        image_size=20,
        class_names=list(data.class_names),
        mean=[0.5],
        std=[0.25],
    )
    torch.manual_seed(0)
    model = create_model(spec).eval()
    save_model(tmp_path / "model.pt", model, spec)

    with stage_context(cfg) as ctx:
        report = evaluate_model(tmp_path / "model.pt", ctx, tmp_path)

    own = _nll(model, data.test, spec.data_config(cfg.data))
    base = _nll(model, data.test, cfg.data)
    assert spec.data_config(cfg.data).image_size == 20 and spec.data_config(cfg.data).mean == [0.5]
    assert abs(report.test_nll - own) < 1e-5
    assert abs(own - base) > 1e-3  # the two resolutions really differ for this model


def test_channels_last_inference_predicts_like_nchw(tmp_path):
    """Labeling, evaluation and analysis load models channels_last (``channels_last: true``):
    NCHW batches then run NHWC from the first convolution on, with the same predictions."""
    from noisystudent.models import load_model

    for in_chans in (1, 3):
        spec = ModelSpec(
            name="resnet10t",
            num_classes=10,
            in_chans=in_chans,
            image_size=32,
            class_names=[str(c) for c in range(10)],
            mean=[0.5],
            std=[0.25],
        )
        torch.manual_seed(in_chans)
        save_model(tmp_path / f"m{in_chans}.pt", create_model(spec).eval(), spec)
        nchw, _ = load_model(tmp_path / f"m{in_chans}.pt")
        nhwc, _ = load_model(tmp_path / f"m{in_chans}.pt", channels_last=True)
        seen = {}
        nhwc.layer1.register_forward_hook(
            lambda mod, inp, out, seen=seen: seen.update(
                nhwc=out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            )
        )
        x = torch.randn(8, in_chans, 32, 32)  # what the loaders yield: plain NCHW
        with torch.inference_mode():
            a, b = nchw(x), nhwc(x)
        assert seen["nhwc"]
        assert torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(1), b.argmax(1))
