"""One training loop for teacher and student alike.

A teacher trains on labeled images only. A student trains on labeled images plus a stream of
pseudo-labeled images (soft or hard targets), under input noise (RandAugment) and model noise
(dropout, stochastic depth). Loss = CE(labeled) + unlabeled_weight * CE(pseudo-labeled, soft).
Each epoch ends with a validation pass, an MLflow metrics row and an atomic checkpoint, so a
killed run resumes at the next epoch. Under torchrun each rank trains on its slice of the data
with DDP; rank 0 alone validates into the log, checkpoints and writes the result.

:func:`train_model` reads top to bottom: resume or start (:meth:`TrainingLoop.start`), then per
epoch train (:meth:`TrainingLoop.train_epoch`), validate, checkpoint and log
(:meth:`TrainingLoop.end_epoch`), then :meth:`TrainingLoop.finish`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config, PseudoTrainConfig, TrainConfig
from ..data.geometry import create_eval_transform
from ..data.imagefolder import LabeledImages
from ..data.pseudo_stream import PseudoLabeledStream
from ..models import ModelSpec, load_checkpoint, save_model, unwrap
from ..records import JsonRecord
from ..resume import DoneMarker
from ..seeds import Seeds, Stream
from . import distributed as ddp
from .batches import Batch, BatchSource
from .build import build_model, start_process, weights_source
from .checkpoint import Checkpointer, Progress
from .device import rng_fingerprint, seed_everything
from .metrics import classification_report
from .optim import NonFiniteGuard, Optimization
from .precision import autocast
from .predict import eval_loader, predict

#: Debug flag for the DDP tests: a directory where every rank writes what it read and drew first.
DEBUG_RANKS_ENV = "NOISYSTUDENT_DEBUG_RANKS"


@dataclass
class TrainResult(JsonRecord):
    """A finished training run; ``result.json`` in its directory (its done marker)."""

    model_path: str
    sha256: str
    spec: dict
    params: int
    history: list = field(default_factory=list)
    best_val_top1: float = 0.0
    seconds: float = 0.0
    world_size: int = 1
    weights_source: str = "random init"  # where the initial weights came from


def result_marker(out_dir: str | Path) -> DoneMarker[TrainResult]:
    return DoneMarker(Path(out_dir) / "result.json", TrainResult)


@dataclass
class TrainingJob:
    """What one training run trains: a recipe and a model, on labeled (and, for a student,
    pseudo-labeled) images, into ``out_dir``."""

    recipe: TrainConfig
    model_name: str
    out_dir: Path
    labeled: LabeledImages
    val: LabeledImages | None = None
    pseudo: PseudoLabeledStream | None = None  # a student's pseudo-labeled stream
    init_from: str | None = None  # start from another checkpoint's weights
    desc: str = "train"  # the progress bar's and log lines' prefix
    generation: int = 0  # which generation's seeds it draws (noisystudent.seeds)

    def model_spec(self, cfg: Config) -> ModelSpec:
        return ModelSpec(
            name=self.model_name,
            num_classes=len(self.labeled.class_names),
            in_chans=cfg.data.channels,
            image_size=cfg.data.image_size,
            class_names=list(self.labeled.class_names),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )


def train_model(job: TrainingJob, cfg: Config, tracker=None) -> TrainResult:
    """Train (or resume) one model in ``job.out_dir``: ``model.pt``, then ``result.json`` last.
    ``tracker`` receives one metrics row per epoch."""
    done = result_marker(job.out_dir).read()
    if done is not None:
        return done
    loop = TrainingLoop.start(job, cfg, tracker)
    for epoch in range(loop.progress.epoch, job.recipe.epochs):
        # this rank's model noise in this epoch: restarted from (seed, generation, epoch, rank), so a
        # resumed run draws what an uninterrupted one would, and ranks draw different dropout masks
        seed_everything(loop.seeds(Stream.MODEL_NOISE, epoch=epoch, rank=loop.env.rank))
        row = loop.train_epoch(epoch)
        row.update(loop.validate(epoch))
        if loop.end_epoch(row):
            break
    return loop.finish()


@dataclass
class TrainingLoop:
    """The state of one training run: the model, its data, optimizer and checkpoints."""

    job: TrainingJob
    cfg: Config
    env: ddp.DistEnv
    model: torch.nn.Module  # the trained module (its weights are saved)
    net: torch.nn.Module  # what runs forward/backward: the model, or its DDP / compiled wrapper
    batches: BatchSource
    optimization: Optimization
    checkpointer: Checkpointer
    progress: Progress
    spec: ModelSpec
    guard: NonFiniteGuard
    val: LabeledImages | None = None  # at this model's resolution (a ladder may change it per generation)
    val_loader: DataLoader | None = None  # this rank's share of it, its workers kept between epochs
    tracker: object | None = None
    started: float = field(default_factory=time.time)
    weights_source: str = "random init"
    first_epoch: int = 0  # the epoch this session starts at (after a resume, not 0)

    @classmethod
    def start(cls, job: TrainingJob, cfg: Config, tracker=None) -> TrainingLoop:
        """Join torchrun's group (if any), build the model and its data, resume from ``last.pt``."""
        job.out_dir.mkdir(parents=True, exist_ok=True)
        env, device = start_process(cfg, job.out_dir, Seeds(cfg.seed, job.generation))
        spec = job.model_spec(cfg)
        model, net = build_model(spec, job.recipe, cfg, device, env, job.init_from)
        source = weights_source(job.recipe, job.init_from)
        if tracker is not None and env.is_main:
            tracker.set_tags({"weights_source": source})
        batches = BatchSource(
            job.recipe,
            job.labeled,
            job.pseudo,
            seeds=Seeds(cfg.seed, job.generation),
            num_workers=cfg.data.num_workers,
            channels_last=cfg.channels_last,
            device=device,
            env=env,
        )
        optimization = Optimization(model, job.recipe, batches.steps_per_epoch, cfg.amp, device)
        checkpointer = Checkpointer(job.out_dir / "last.pt")
        progress = checkpointer.resume(model, optimization)
        guard = NonFiniteGuard(cfg.max_nonfinite_steps, model)
        val = job.val.with_transform(create_eval_transform(cfg.data)) if job.val is not None else None
        val_loader = validation_loader(val, env, device) if val is not None else None
        loop = cls(
            job,
            cfg,
            env,
            model,
            net,
            batches,
            optimization,
            checkpointer,
            progress,
            spec,
            guard,
            val,
            val_loader,
            tracker,
            weights_source=source,
        )
        loop.first_epoch = progress.epoch
        if progress.epoch:
            loop.started -= progress.seconds
            print(f"[{job.desc}] resuming after epoch {progress.epoch}/{job.recipe.epochs}")
        return loop

    @property
    def seeds(self) -> Seeds:
        return Seeds(self.cfg.seed, self.job.generation)

    def train_epoch(self, epoch: int) -> dict:
        debug = bool(os.environ.get(DEBUG_RANKS_ENV)) and epoch == self.first_epoch
        drawn = rng_fingerprint(self.batches.device) if debug else None  # before the epoch draws anything
        row = train_epoch(self, epoch)
        if debug:
            first_pass = self.batches.sampler.first_pass()
            self.debug_record(labeled_indices=first_pass, pseudo_shards=self.batches.pseudo_shards(), noise_draw=drawn)
        return row

    def validate(self, epoch: int) -> dict:
        """Validation metrics at the epochs the recipe asks for. Every rank predicts its share of
        the split with rank 0's weights and BatchNorm statistics (ranks' statistics drift apart);
        rank 0 scores the whole split and every rank records the row."""
        recipe = self.job.recipe
        if self.val is None or not ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
            return {}
        weights = self.optimization.weights(self.model)
        ddp.broadcast_buffers(weights)
        cfg = self.cfg
        predicted = predict(weights, self.val_loader, self.batches.device, cfg.amp, cfg.channels_last)
        parts = ddp.gather_to_main(predicted)
        return ddp.broadcast_object(validation_metrics(parts, len(self.val.class_names)) if parts else None)

    def end_epoch(self, row: dict) -> bool:
        """Record the epoch, keep the best weights, checkpoint, log; True to stop early."""
        recipe, desc = self.job.recipe, self.job.desc
        if self.progress.record(row) and recipe.early_stop_patience > 0 and self.env.is_main:
            save_model(self.job.out_dir / "best.pt", self.optimization.weights(self.model), self.spec)
        # rank 0's decision on every rank: ranks that disagreed would hang at the next collective
        stop = ddp.broadcast_object(
            recipe.early_stop_patience > 0 and row["epoch"] - self.progress.best_epoch >= recipe.early_stop_patience
        )
        if self.env.is_main:
            shown = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"
            )
            print(f"[{desc}] epoch {row['epoch']}/{recipe.epochs} {shown}")
            # checkpoint first: if the tracking server is gone, the epoch is still safe on disk
            self.checkpointer.save(self.model, self.optimization, self.progress, time.time() - self.started)
            if self.tracker is not None:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            if stop:
                print(f"[{desc}] early stop: no val improvement for {recipe.early_stop_patience} epochs")
        ddp.barrier()
        return stop

    def finish(self) -> TrainResult:
        """Write ``model.pt`` (the best epoch's weights under early stopping), then ``result.json``."""
        out_dir, env = self.job.out_dir, self.env
        self.debug_record(epochs=self.progress.epoch)
        if not env.is_main:
            ddp.barrier()  # rank 0 writes model.pt and result.json
            return result_marker(out_dir).read()
        model = self.optimization.weights(self.model)
        if self.job.recipe.early_stop_patience > 0 and (out_dir / "best.pt").is_file():
            unwrap(model).load_state_dict(load_checkpoint(out_dir / "best.pt")["model"])
        sha = save_model(out_dir / "model.pt", model, self.spec, extra={"history": self.progress.history})
        result = TrainResult(
            model_path=str(out_dir / "model.pt"),
            sha256=sha,
            spec=self.spec.as_dict(),
            params=sum(p.numel() for p in model.parameters()),
            history=self.progress.history,
            best_val_top1=self.progress.best_top1,
            seconds=time.time() - self.started,
            world_size=env.world_size,
            weights_source=self.weights_source,
        )
        result_marker(out_dir).write(result)
        self.checkpointer.remove()
        ddp.barrier()
        return result

    def debug_record(self, **fields) -> None:
        """Under ``$NOISYSTUDENT_DEBUG_RANKS`` (a directory; the DDP tests set it), each rank merges
        ``fields`` into its ``rank-<r>.json`` there: what it read, what it drew, how far it went."""
        where = os.environ.get(DEBUG_RANKS_ENV)
        if not where:
            return
        path = Path(where) / f"rank-{self.env.rank}.json"
        record = json.loads(path.read_text()) if path.is_file() else {"rank": self.env.rank}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, **fields}))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def step_losses(logits: torch.Tensor, batch: Batch, recipe: TrainConfig | PseudoTrainConfig) -> dict[str, torch.Tensor]:
    """The step's loss (first entry, the one optimised) and its parts, by metric name."""
    labeled = F.cross_entropy(logits[: batch.n_labeled], batch.labels, label_smoothing=recipe.label_smoothing)
    if batch.soft_targets is None:
        return {"train_loss": labeled, "train_labeled_loss": labeled}
    # distillation softens the model's logits too and scales the loss by T^2 (Hinton et al.); T = 1: a student's loss
    t = recipe.logit_temperature
    unlabeled = logits[batch.n_labeled :]
    pseudo = (
        soft_cross_entropy(unlabeled, batch.soft_targets)
        if t == 1.0
        else soft_cross_entropy(unlabeled / t, batch.soft_targets) * t**2
    )
    return {
        "train_loss": labeled + recipe.unlabeled_weight * pseudo,
        "train_labeled_loss": labeled,
        "train_pseudo_loss": pseudo,
    }


def train_epoch(loop: TrainingLoop, epoch: int) -> dict:
    """One epoch of steps; returns its metrics row (mean losses over every rank's applied steps,
    skipped steps, throughput, LR). The losses stay on the device and are read back every
    ``log_every`` steps for the progress bar, and once at the end."""
    model, batches, optimization, recipe = loop.model, loop.batches, loop.optimization, loop.job.recipe
    desc, show = loop.job.desc, loop.env.is_main
    model.train()
    epoch_start = time.time()
    sums: dict[str, torch.Tensor] = {}
    steps = skipped = seen = 0
    bar = tqdm(
        total=batches.steps_per_epoch,
        desc=f"[{desc}] epoch {epoch + 1}/{recipe.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=not show,
    )
    for batch in batches.epoch(epoch):
        loop.guard.before_forward()
        with autocast(batches.device, loop.cfg.amp):
            logits = loop.net(batch.images).float()
        losses = step_losses(logits, batch, recipe)
        finite = optimization.step(losses["train_loss"], model, step=epoch * batches.steps_per_epoch + steps)
        steps, seen = steps + 1, seen + batch.images.shape[0]
        if not finite:
            skipped += 1
            detail = _nonfinite_detail(losses, optimization, model)
            if show:
                tqdm.write(f"[{desc}] epoch {epoch + 1} step {steps}: step skipped, {detail}")
            loop.guard.skipped(f"epoch {epoch + 1} step {steps}", detail)
            continue
        loop.guard.passed()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double()  # exact sums, as Python floats were
        if show and steps % loop.cfg.log_every_steps == 0:
            _refresh(bar, steps, sums, steps - skipped, optimization.lr)
    if show:
        _refresh(bar, steps, sums, steps - skipped, optimization.lr)
    bar.close()
    total = ddp.reduce_sums({"steps": steps - skipped, "seen": seen, **sums})
    per_step = max(1.0, total.pop("steps"))
    seconds = ddp.reduce_max(time.time() - epoch_start)
    return {
        "epoch": epoch + 1,
        **{name: total[name] / per_step for name in sums},
        "skipped_steps": skipped,
        "lr": optimization.lr,
        "images_per_sec": total.pop("seen") / max(1e-9, seconds),
    }


def _refresh(bar: tqdm, steps: int, sums: dict[str, torch.Tensor], applied: int, lr: float) -> None:
    """Move the bar to ``steps`` and show the mean loss so far (one read back from the device)."""
    bar.update(steps - bar.n)
    if "train_loss" in sums:
        bar.set_postfix(loss=f"{sums['train_loss'].item() / max(1, applied):.3f}", lr=f"{lr:.2e}")


def _nonfinite_detail(losses: dict[str, torch.Tensor], optimization: Optimization, model: torch.nn.Module) -> str:
    names = {p: n for n, p in model.named_parameters()}
    values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    bad = optimization.nonfinite_parameters(names)
    return f"{values}; non-finite gradients: {', '.join(bad) if bad else 'none'}"


def validation_loader(val: LabeledImages, env: ddp.DistEnv, device: torch.device) -> DataLoader:
    """This rank's share of the validation split (every ``world_size``-th image), in a loader whose
    workers persist between epochs (forking them at every validation stalls a GPU)."""
    share = Subset(val, range(env.rank, len(val), env.world_size)) if env.enabled else val
    return eval_loader(share, device, persistent=True)


def validation_metrics(parts: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """The per-epoch validation row from every rank's (probabilities, targets): top-1, loss (NLL), ECE."""
    parts = [part for part in parts if len(part[1])]
    probs, targets = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
    report = classification_report(probs, targets, num_classes)
    return {"val_top1": report.top1, "val_loss": report.nll, "val_ece": report.ece}
