"""One training loop for teacher and student alike.

A teacher trains on labeled images only. A student trains on labeled images plus a stream of
pseudo-labeled images (soft or hard targets), under input noise (RandAugment) and model noise
(dropout, stochastic depth). Loss = CE(labeled) + unlabeled_weight * CE(pseudo-labeled, soft).
Each epoch ends with a validation pass, an MLflow metrics row and an atomic checkpoint, so a
killed run resumes at the next epoch.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed as ddp
from .config import Config, ConfigError, TrainConfig
from .data.imagefolder import LabeledImages
from .data.sampler import EpochSampler
from .data.pseudo_labels import PseudoLabeledStream
from .evaluate import classification_report, predict
from .io import read_json, remove_stale_temporaries, write_json_atomic
from .models import ModelSpec, create_model, load_checkpoint, save_checkpoint, save_model, unwrap
from .noise import create_eval_transform, reseed_augmentation, reseed_worker
from .precision import resolve_amp


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' asks for cuda but no GPU is visible; use device=cpu or auto")
    return torch.device(name)


def resolve_num_workers(requested: int, device: torch.device) -> int:
    """Loader workers for ``data.num_workers`` (-1 = auto). On CPU the train step already uses
    torch's threads, so a worker only pays off on a core those threads leave free."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(0, min(8, cores - 1))
    return max(0, min(8, cores - torch.get_num_threads()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def create_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for both AdamW and SGD recipes).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused kernel per step for all tensors (torch only defaults to it on CUDA; the
    # per-tensor loop costs ~10% of a small model's CPU step)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True, foreach=True)
    return torch.optim.AdamW(groups, lr=t.lr, foreach=True)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def start_pass(loader: DataLoader) -> Iterator:
    """A new pass over the pseudo-labeled stream with its augmentation reseeded from torch's RNG
    (saved in checkpoints) first; its workers are forked per pass and inherit the seed."""
    reseed_augmentation(loader.dataset.transform, int(torch.randint(0, 2**31 - 1, (1,)).item()))
    return iter(loader)


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


def train_model(
    stage: TrainConfig,
    cfg: Config,
    model_name: str,
    out_dir: str | Path,
    labeled: LabeledImages,
    val: LabeledImages | None,
    pseudo: PseudoLabeledStream | None = None,
    tracker=None,
    init_from: str | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train (or resume) one model in ``out_dir``; writes ``model.pt`` and ``DONE`` at the end.

    Under torchrun each rank trains on its slice of the data with DDP; rank 0 alone validates
    into the log, checkpoints and writes the result, which every rank returns.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "DONE").is_file():
        return TrainResult(**read_json(out_dir / "result.json"))
    env = ddp.init_distributed()
    device = resolve_device(cfg.device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if env.is_main:  # rank 0 alone writes here: a temp file left now is from a writer killed mid-write
        remove_stale_temporaries(out_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    start = time.time()

    # ---- model: timm by name, with model noise (dropout, stochastic depth)
    spec = ModelSpec(name=model_name, num_classes=len(labeled.class_names), in_chans=cfg.data.channels,
                     image_size=cfg.data.image_size, class_names=list(labeled.class_names),
                     mean=list(cfg.data.mean), std=list(cfg.data.std))
    model = create_model(spec, drop_rate=stage.drop_rate, drop_path_rate=stage.drop_path_rate)
    if init_from:
        missing = model.load_state_dict(load_checkpoint(init_from)["model"], strict=False)
        if missing.missing_keys:
            raise ValueError(f"student.init=teacher needs the same architecture; missing keys e.g. {missing.missing_keys[:3]}")
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    # the module that runs forward/backward: DDP averages gradients across ranks
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None) \
        if env.enabled else model
    if cfg.compile:
        net = torch.compile(net)

    # ---- data: labeled batches, plus pseudo-labeled batches for a student
    if val is not None:  # validate at this model's resolution (a ladder may change it per generation)
        val = val.with_transform(create_eval_transform(cfg.data))
    pin = device.type == "cuda"
    workers = resolve_num_workers(cfg.data.num_workers, device)
    if pseudo is not None:
        pseudo.rank, pseudo.world_size = env.rank, env.world_size  # each rank reads its own shards
        unl_bs = stage.unlabeled_batch_size
        # workers are forked per pass (one per epoch) and inherit the freshly reseeded augmentation
        unl_loader = DataLoader(pseudo, batch_size=unl_bs, drop_last=True, num_workers=min(workers, max(1, len(pseudo.shards))),
                                pin_memory=pin, persistent_workers=False, worker_init_fn=reseed_worker)
        if len(pseudo) < unl_bs:
            raise ConfigError(f"only {len(pseudo)} pseudo-labeled samples selected per rank, fewer than one batch of "
                              f"{unl_bs}: lower pseudo_label.threshold or student.unlabeled_ratio / student.batch_size")
        steps_per_epoch = max(1, len(pseudo) // unl_bs)
    lab_bs = min(stage.batch_size, len(labeled) // env.world_size)
    if pseudo is None:
        steps_per_epoch = len(labeled) // env.world_size // lab_bs
    steps_per_epoch = stage.steps_per_epoch or steps_per_epoch
    total_steps = steps_per_epoch * stage.epochs
    # One labeled iteration per epoch, however many passes it spans; shuffling, rank slices and
    # augmentation seeds come from (seed, epoch), so the workers can persist (data/sampler.py).
    sampler = EpochSampler(len(labeled), lab_bs, steps_per_epoch, cfg.seed, env.rank, env.world_size)
    # its own generator: creating the (persistent) worker iterator draws a base seed, which must
    # not come from the global torch RNG that dropout uses and checkpoints restore
    lab_loader = DataLoader(labeled, batch_size=lab_bs, sampler=sampler, drop_last=True, num_workers=workers,
                            pin_memory=pin, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(cfg.seed))

    optimizer = create_optimizer(model, stage)
    # EMA of the weights: validated, saved and handed on instead of the raw weights when enabled
    ema = ModelEmaV3(model, decay=stage.ema_decay, use_warmup=True) if stage.ema_decay > 0 else None
    scheduler = cosine_with_warmup(optimizer, int(stage.warmup_epochs * steps_per_epoch), total_steps)
    amp = resolve_amp(cfg.amp, device)
    use_amp = amp != "off"
    amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")

    # ---- resume from the last finished epoch
    history: list[dict] = []
    data_by_rank: list = []
    first_epoch, best_top1, best_epoch = 0, -1.0, -1
    last = out_dir / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        first_epoch, history = state["epoch"], list(state["history"])
        start -= state.get("seconds", 0.0)  # keep wall time cumulative across resumes
        best_top1, best_epoch = state["best_top1"], state["best_epoch"]
        print(f"[{desc}] resuming after epoch {first_epoch}/{stage.epochs}")

    for epoch in range(first_epoch, stage.epochs):
        model.train()
        epoch_start = time.time()
        seen, loss_sum, lab_loss_sum, unl_loss_sum = 0, 0.0, 0.0, 0.0
        sampler.set_epoch(epoch)
        lab_iter = iter(lab_loader)
        if pseudo is not None:
            pseudo.set_epoch(epoch)
            unl_iter = start_pass(unl_loader)
        bar = tqdm(range(steps_per_epoch), desc=f"[{desc}] epoch {epoch + 1}/{stage.epochs}", leave=False, dynamic_ncols=True,
                   disable=not env.is_main)
        for _ in bar:
            x, y = next(lab_iter)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n_lab = x.shape[0]
            if pseudo is not None:
                try:
                    xu, yu = next(unl_iter)
                except StopIteration:
                    if not env.enabled and not stage.steps_per_epoch:  # fewer batches than estimated (skips)
                        break
                    # a fixed step budget, or ranks holding different shard counts: start another pass
                    unl_iter = start_pass(unl_loader)
                    xu, yu = next(unl_iter)
                x = torch.cat([x, xu.to(device, non_blocking=True)])
                yu = yu.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(x).float()
            lab_loss = F.cross_entropy(logits[:n_lab], y, label_smoothing=stage.label_smoothing)
            loss = lab_loss
            if pseudo is not None:
                unl_loss = soft_cross_entropy(logits[n_lab:], yu)
                loss = lab_loss + stage.unlabeled_weight * unl_loss
                unl_loss_sum += unl_loss.item()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if stage.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=epoch * steps_per_epoch + bar.n)
            seen += x.shape[0]
            loss_sum += loss.item()
            lab_loss_sum += lab_loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        sums = ddp.reduce_sums({"steps": bar.n, "seen": seen, "loss": loss_sum, "lab": lab_loss_sum, "unl": unl_loss_sum})
        steps = max(1.0, sums["steps"])
        row = {"epoch": epoch + 1, "train_loss": sums["loss"] / steps, "train_labeled_loss": sums["lab"] / steps,
               "lr": scheduler.get_last_lr()[0],
               "images_per_sec": sums["seen"] / max(1e-9, ddp.reduce_max(time.time() - epoch_start))}
        if pseudo is not None:
            row["train_pseudo_loss"] = sums["unl"] / steps
        if val is not None and ((epoch + 1) % max(1, stage.eval_every) == 0 or epoch + 1 == stage.epochs):
            report = classification_report(*predict(ema.module if ema is not None else model, _eval_loader(val, device),
                                                    device, amp, cfg.channels_last),
                                           len(labeled.class_names))
            row.update(val_top1=report.top1, val_loss=report.nll, val_ece=report.ece)
            if report.top1 > best_top1:
                best_top1, best_epoch = report.top1, epoch + 1
                if stage.early_stop_patience > 0 and env.is_main:
                    save_model(out_dir / "best.pt", ema.module if ema is not None else model, spec)
        history.append(row)
        if epoch == first_epoch and env.enabled:  # what each rank read, for the record (and the DDP test)
            data_by_rank = ddp.gather_objects({
                "rank": env.rank, "labeled_indices": sampler.first_pass(),
                "pseudo_shards": pseudo._my_shards() if pseudo is not None else []})
        stop = stage.early_stop_patience > 0 and epoch + 1 - best_epoch >= stage.early_stop_patience
        if env.is_main:  # every rank validated the same weights; rank 0 alone logs and checkpoints
            print(f"[{desc}] epoch {epoch + 1}/{stage.epochs} " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"))
            # checkpoint first: if the tracking server is gone, the epoch is still safe on disk
            save_checkpoint(last, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch + 1,
                                   "history": history, "best_top1": best_top1, "best_epoch": best_epoch,
                                   "seconds": time.time() - start,
                                   **({"ema": ema.module.state_dict()} if ema is not None else {})})
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if stop:
                print(f"[{desc}] early stop: no val improvement for {stage.early_stop_patience} epochs")
        ddp.barrier()
        if stop:
            break

    if not env.is_main:
        ddp.barrier()  # rank 0 writes model.pt and result.json
        return TrainResult(**read_json(out_dir / "result.json"))
    if ema is not None:
        model = ema.module
    if stage.early_stop_patience > 0 and (out_dir / "best.pt").is_file():
        best = load_checkpoint(out_dir / "best.pt")
        unwrap(model).load_state_dict(best["model"])
    sha = save_model(out_dir / "model.pt", model, spec, extra={"history": history})
    result = TrainResult(model_path=str(out_dir / "model.pt"), sha256=sha, spec=spec.as_dict(), params=params,
                         history=history, best_val_top1=best_top1, seconds=time.time() - start,
                         world_size=env.world_size, data_by_rank=data_by_rank)
    write_json_atomic(out_dir / "result.json", result.__dict__)
    (out_dir / "DONE").write_text("")
    last.unlink(missing_ok=True)
    last.with_name("last.pt.sha256").unlink(missing_ok=True)
    ddp.barrier()
    return result


def _eval_loader(dataset, device: torch.device, batch_size: int = 512) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, pin_memory=device.type == "cuda")
