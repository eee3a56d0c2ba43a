"""One training loop for teacher and student alike.

A teacher trains on labeled images only. A student trains on labeled images plus a stream of
pseudo-labeled images (soft or hard targets), under input noise (RandAugment) and model noise
(dropout, stochastic depth). Loss = CE(labeled) + unlabeled_weight * CE(pseudo-labeled, soft).
Each epoch ends with a validation pass, an MLflow metrics row and an atomic checkpoint, so a
killed run resumes at the next epoch. Under torchrun each rank trains on its slice of the data
with DDP; rank 0 alone validates into the log, checkpoints and writes the result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config, TrainConfig
from ..data.imagefolder import LabeledImages
from ..data.pseudo_stream import PseudoLabeledStream
from ..io import read_json, remove_stale_temporaries, sha256_file, write_json_atomic
from ..models import ModelSpec, create_model, load_checkpoint, save_model, unwrap
from ..noise import create_eval_transform
from . import distributed as ddp
from .batches import Batch, BatchSource
from .checkpoint import Checkpointer, Progress
from .device import epoch_seed, resolve_device, rng_fingerprint, seed_everything
from .evaluate import eval_loader, predict
from .metrics import classification_report
from .optim import NonFiniteGuard, Optimization
from .precision import autocast, keep_fp32_where_cpu_bf16_fails, resolve_amp


@dataclass
class TrainResult:
    model_path: str
    sha256: str
    spec: dict
    params: int
    history: list = field(default_factory=list)
    best_val_top1: float = 0.0
    seconds: float = 0.0
    world_size: int = 1
    data_by_rank: list = field(default_factory=list)  # under torchrun: what each rank read in its first epoch
    epochs_by_rank: list = field(default_factory=list)  # under torchrun: the epochs each rank trained (all equal)
    weights_source: str = "random init"  # where the initial weights came from

    @classmethod
    def load(cls, out_dir: Path) -> TrainResult:
        return cls(**read_json(out_dir / "result.json"))


def train_model(
    recipe: TrainConfig,
    cfg: Config,
    model_name: str,
    out_dir: str | Path,
    labeled: LabeledImages,
    val: LabeledImages | None = None,
    *,
    pseudo: PseudoLabeledStream | None = None,
    tracker=None,
    init_from: str | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train (or resume) one model in ``out_dir``; writes ``model.pt`` and ``DONE`` at the end.

    A student passes its ``pseudo``-labeled stream; ``init_from`` starts from another checkpoint's
    weights; ``tracker`` receives one metrics row per epoch."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "DONE").is_file():
        return TrainResult.load(out_dir)
    env, device = _start_process(cfg, out_dir)
    start = time.time()
    spec = ModelSpec(
        name=model_name,
        num_classes=len(labeled.class_names),
        in_chans=cfg.data.channels,
        image_size=cfg.data.image_size,
        class_names=list(labeled.class_names),
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
    )
    model, net = build_model(spec, recipe, cfg, device, env, init_from)
    source = weights_source(recipe, init_from)
    if tracker is not None and env.is_main:
        tracker.set_tags({"weights_source": source})
    batches = BatchSource(
        recipe,
        labeled,
        pseudo,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        channels_last=cfg.channels_last,
        device=device,
        env=env,
    )
    if val is not None:  # validate at this model's resolution (a ladder may change it per generation)
        val = val.with_transform(create_eval_transform(cfg.data))
    optimization = Optimization(model, recipe, batches.steps_per_epoch, cfg.amp, device)
    checkpointer = Checkpointer(out_dir / "last.pt")
    progress = checkpointer.resume(model, optimization)
    if progress.epoch:
        start -= progress.seconds
        print(f"[{desc}] resuming after epoch {progress.epoch}/{recipe.epochs}")

    guard = NonFiniteGuard(cfg.max_nonfinite_steps, model)
    first_epoch, data_by_rank = progress.epoch, []
    for epoch in range(first_epoch, recipe.epochs):
        seed_everything(epoch_seed(cfg.seed, env.rank, epoch))  # this rank's model noise and pseudo-label augmentation
        noise_draw = rng_fingerprint(device) if epoch == first_epoch and env.enabled else None
        row = train_epoch(
            net,
            model,
            batches,
            optimization,
            guard,
            recipe,
            epoch,
            amp=cfg.amp,
            log_every=cfg.log_every_steps,
            desc=desc,
            show_progress=env.is_main,
        )
        if val is not None and ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
            # rank 0 validates its weights (ranks' BatchNorm statistics differ) and every rank records its metrics
            row.update(
                ddp.broadcast_object(validate(optimization.weights(model), val, device, cfg) if env.is_main else None)
            )
        if progress.record(row) and recipe.early_stop_patience > 0 and env.is_main:
            save_model(out_dir / "best.pt", optimization.weights(model), spec)
        if epoch == first_epoch and env.enabled:
            data_by_rank = ddp.gather_objects({**batches.first_pass_record(env.rank), "noise_draw": noise_draw})
        # rank 0's decision on every rank: ranks that disagreed would hang at the next collective
        stop = ddp.broadcast_object(
            recipe.early_stop_patience > 0 and epoch + 1 - progress.best_epoch >= recipe.early_stop_patience
        )
        if env.is_main:
            print(
                f"[{desc}] epoch {epoch + 1}/{recipe.epochs} "
                + " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"
                )
            )
            # checkpoint first: if the tracking server is gone, the epoch is still safe on disk
            checkpointer.save(model, optimization, progress, time.time() - start)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if stop:
                print(f"[{desc}] early stop: no val improvement for {recipe.early_stop_patience} epochs")
        ddp.barrier()
        if stop:
            break
    return finish(
        out_dir,
        optimization.weights(model),
        spec,
        recipe,
        progress,
        time.time() - start,
        env,
        {"data_by_rank": data_by_rank, "epochs_by_rank": ddp.gather_objects(progress.epoch), "weights_source": source},
        checkpointer,
    )


def _start_process(cfg: Config, out_dir: Path) -> tuple[ddp.DistEnv, torch.device]:
    """Join torchrun's process group (if any), pick the device, clear stale temporaries, seed."""
    env = ddp.init_distributed()
    device = resolve_device(cfg.device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if env.is_main:  # rank 0 alone writes here: a temp file left now is from a writer killed mid-write
        remove_stale_temporaries(out_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return env, device


def build_model(
    spec: ModelSpec, recipe: TrainConfig, cfg: Config, device: torch.device, env: ddp.DistEnv, init_from: str | None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The timm model with this stage's model noise, and the module that runs forward/backward
    (DDP averages gradients across ranks; ``compile`` wraps it)."""
    starts_from_weights = not init_from  # init_from replaces every weight: fetching pretrained ones would be wasted
    model = create_model(
        spec,
        drop_rate=recipe.drop_rate,
        drop_path_rate=recipe.drop_path_rate,
        pretrained=recipe.pretrained and starts_from_weights,
        pretrained_file=recipe.pretrained_file if starts_from_weights else "",
    )
    if init_from:
        missing = model.load_state_dict(load_checkpoint(init_from)["model"], strict=False)
        if missing.missing_keys:
            raise ValueError(
                f"student.init=teacher needs the same architecture; missing keys e.g. {missing.missing_keys[:3]}"
            )
    model.to(device)
    if device.type == "cpu" and resolve_amp(cfg.amp, device) == "bf16":
        keep_fp32_where_cpu_bf16_fails(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
        if env.enabled
        else model
    )
    if cfg.compile:
        net = torch.compile(net)
    return model, net


def weights_source(recipe: TrainConfig, init_from: str | None) -> str:
    """Where a stage's initial weights come from, for result.json and the MLflow tag ``weights_source``."""
    if init_from:
        return f"checkpoint {init_from}"
    if recipe.pretrained_file:
        return f"file {recipe.pretrained_file} (sha256 {sha256_file(recipe.pretrained_file)[:16]})"
    return "timm pretrained (hub)" if recipe.pretrained else "random init"


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def step_losses(logits: torch.Tensor, batch: Batch, recipe: TrainConfig) -> dict[str, torch.Tensor]:
    """The step's loss (first entry, the one optimised) and its parts, by metric name."""
    labeled = F.cross_entropy(logits[: batch.n_labeled], batch.labels, label_smoothing=recipe.label_smoothing)
    if batch.soft_targets is None:
        return {"train_loss": labeled, "train_labeled_loss": labeled}
    pseudo = soft_cross_entropy(logits[batch.n_labeled :], batch.soft_targets)
    return {
        "train_loss": labeled + recipe.unlabeled_weight * pseudo,
        "train_labeled_loss": labeled,
        "train_pseudo_loss": pseudo,
    }


def train_epoch(
    net: torch.nn.Module,
    model: torch.nn.Module,
    batches: BatchSource,
    optimization: Optimization,
    guard: NonFiniteGuard,
    recipe: TrainConfig,
    epoch: int,
    *,
    amp: str,
    log_every: int,
    desc: str,
    show_progress: bool,
) -> dict:
    """One epoch of steps; returns its metrics row (mean losses over every rank's applied steps,
    skipped steps, throughput, LR). The losses stay on the device and are read back every
    ``log_every`` steps for the progress bar, and once at the end."""
    model.train()
    epoch_start = time.time()
    sums: dict[str, torch.Tensor] = {}
    steps = skipped = seen = 0
    bar = tqdm(
        total=batches.steps_per_epoch,
        desc=f"[{desc}] epoch {epoch + 1}/{recipe.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=not show_progress,
    )
    for batch in batches.epoch(epoch):
        guard.before_forward()
        with autocast(batches.device, amp):
            logits = net(batch.images).float()
        losses = step_losses(logits, batch, recipe)
        finite = optimization.step(losses["train_loss"], model, step=epoch * batches.steps_per_epoch + steps)
        steps, seen = steps + 1, seen + batch.images.shape[0]
        if not finite:
            skipped += 1
            detail = _nonfinite_detail(losses, optimization, model)
            if show_progress:
                tqdm.write(f"[{desc}] epoch {epoch + 1} step {steps}: step skipped, {detail}")
            guard.skipped(f"epoch {epoch + 1} step {steps}", detail)
            continue
        guard.passed()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double()  # exact sums, as Python floats were
        if show_progress and steps % log_every == 0:
            _refresh(bar, steps, sums, steps - skipped, optimization.lr)
    if show_progress:
        _refresh(bar, steps, sums, steps - skipped, optimization.lr)
    bar.close()
    total = ddp.reduce_sums({"steps": steps - skipped, "seen": seen, **sums}, batches.device)
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


def validate(model: torch.nn.Module, val: LabeledImages, device: torch.device, cfg: Config) -> dict:
    report = classification_report(
        *predict(model, eval_loader(val, device), device, cfg.amp, cfg.channels_last), len(val.class_names)
    )
    return {"val_top1": report.top1, "val_loss": report.nll, "val_ece": report.ece}


def finish(
    out_dir: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    recipe: TrainConfig,
    progress: Progress,
    seconds: float,
    env: ddp.DistEnv,
    record: dict,
    checkpointer: Checkpointer,
) -> TrainResult:
    """Write ``model.pt`` (the best epoch's weights under early stopping), ``result.json`` and ``DONE``."""
    if not env.is_main:
        ddp.barrier()  # rank 0 writes model.pt and result.json
        return TrainResult.load(out_dir)
    if recipe.early_stop_patience > 0 and (out_dir / "best.pt").is_file():
        unwrap(model).load_state_dict(load_checkpoint(out_dir / "best.pt")["model"])
    sha = save_model(out_dir / "model.pt", model, spec, extra={"history": progress.history})
    result = TrainResult(
        model_path=str(out_dir / "model.pt"),
        sha256=sha,
        spec=spec.as_dict(),
        params=sum(p.numel() for p in model.parameters()),
        history=progress.history,
        best_val_top1=progress.best_top1,
        seconds=seconds,
        world_size=env.world_size,
        data_by_rank=record["data_by_rank"],
        epochs_by_rank=record["epochs_by_rank"] if env.enabled else [],
        weights_source=record["weights_source"],
    )
    write_json_atomic(out_dir / "result.json", asdict(result))
    (out_dir / "DONE").write_text("")
    checkpointer.remove()
    ddp.barrier()
    return result
