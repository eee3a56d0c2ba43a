"""Stage 1: the generation-0 teacher, trained on the labeled images alone (with its own noise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.train import TrainingJob, TrainResult, train_model
from ..noise import create_train_transform
from ..plots import learning_curves_png
from ..seeds import Seeds, Stream
from .stage import StageBase, StageContext


@dataclass
class TeacherStage(StageBase):
    """Train the teacher into ``out_dir`` (it resumes from its last epoch; ``result.json`` marks
    the training done, and the stage logs each time it runs)."""

    out_dir: Path
    name: str = "teacher"

    def run(self, ctx: StageContext) -> TrainResult:
        cfg = ctx.cfg
        noise = create_train_transform(cfg.data, cfg.teacher.augment, seed=Seeds(cfg.seed, 0)(Stream.VIEW_NOISE))
        job = TrainingJob(
            cfg.teacher,
            cfg.model_for_generation(0),
            self.out_dir,
            ctx.data.train.with_transform(noise),
            ctx.data.val,
            desc="gen 0 teacher",
        )
        return train_model(job, cfg, ctx.tracker)

    def metrics(self, record: TrainResult) -> dict[str, float]:
        return {}  # one row per epoch, logged while training

    def artifacts(self, record: TrainResult) -> list[Path]:
        return trained_model_artifacts(record, "gen 0 teacher")


def trained_model_artifacts(record: TrainResult, title: str) -> list[Path]:
    """A trained model's files for MLflow: its weights, hash, record and learning curves."""
    model_path = Path(record.model_path)
    curves = model_path.with_name("learning_curves.png")
    learning_curves_png(record.history, curves, f"{title} ({record.spec['name']})")
    return [model_path.with_name("result.json"), model_path, model_path.with_name("model.pt.sha256"), curves]
