"""Stage 1: the generation-0 teacher, trained on the labeled images alone (with its own noise)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.imagefolder import LabeledData
from ..engine.train import TrainResult, train_model
from ..noise import create_train_transform


def train_teacher(cfg: Config, out_dir: Path, data: LabeledData, tracker=None) -> TrainResult:
    labeled = data.train.with_transform(create_train_transform(cfg.data, cfg.teacher.augment, seed=cfg.seed))
    return train_model(
        cfg.teacher, cfg, cfg.model_for_generation(0), out_dir, labeled, data.val, tracker=tracker, desc="gen 0 teacher"
    )
