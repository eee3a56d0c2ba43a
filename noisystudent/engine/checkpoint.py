"""Resume and save of a training stage: ``last.pt`` holds everything needed to continue after the
last finished epoch (weights, optimizer, schedule, EMA, RNG state, metrics history), written
atomically, so a killed run resumes exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import load_checkpoint, save_checkpoint, unwrap
from .device import rng_state, set_rng_state
from .optim import Optimization


@dataclass
class Progress:
    """How far a stage is: finished epochs, their metric rows, the best validation so far."""

    epoch: int = 0  # epochs finished
    history: list = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = -1
    seconds: float = 0.0  # training time of earlier sessions: wall time stays cumulative across resumes

    def record(self, row: dict) -> bool:
        """Add a finished epoch's row; True if its validation top-1 is the best so far."""
        self.history.append(row)
        self.epoch = row["epoch"]
        if "val_top1" in row and row["val_top1"] > self.best_top1:
            self.best_top1, self.best_epoch = row["val_top1"], row["epoch"]
            return True
        return False


class Checkpointer:
    def __init__(self, path: Path):
        self.path = Path(path)

    def resume(self, model: torch.nn.Module, optimization: Optimization) -> Progress:
        """Load the last checkpoint into ``model`` and ``optimization`` (and the RNGs); a fresh Progress if none."""
        if not self.path.is_file():
            return Progress()
        state = load_checkpoint(self.path)
        model.load_state_dict(state["model"])
        optimization.load_state_dict(state)
        set_rng_state(state["rng"])
        return Progress(
            state["epoch"], list(state["history"]), state["best_top1"], state["best_epoch"], state.get("seconds", 0.0)
        )

    def save(self, model: torch.nn.Module, optimization: Optimization, progress: Progress, seconds: float) -> None:
        save_checkpoint(
            self.path,
            {
                "model": unwrap(model).state_dict(),
                **optimization.state_dict(),
                "rng": rng_state(),
                "epoch": progress.epoch,
                "history": progress.history,
                "best_top1": progress.best_top1,
                "best_epoch": progress.best_epoch,
                "seconds": seconds,
            },
        )

    def remove(self) -> None:
        """The stage is finished: its model.pt replaces the checkpoint."""
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".sha256").unlink(missing_ok=True)
