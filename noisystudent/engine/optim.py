"""Optimizers and the learning-rate schedule shared by every stage."""
from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3

from ..config import TrainConfig
from .precision import resolve_amp


def create_optimizer(model: torch.nn.Module, recipe: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for both AdamW and SGD recipes).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused kernel per step for all tensors; torch only defaults to it on CUDA, and the
    # per-tensor loop is a visible share of a small model's CPU step (docs/benchmarks.md)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True, foreach=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, foreach=True)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Optimization:
    """Everything one optimizer step updates: the optimizer, the LR schedule, fp16 loss scaling and
    the optional EMA of the weights (validated, saved and handed on instead of the raw weights)."""

    def __init__(self, model: torch.nn.Module, recipe: TrainConfig, steps_per_epoch: int, amp: str, device: torch.device):
        self.optimizer = create_optimizer(model, recipe)
        self.ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True) if recipe.ema_decay > 0 else None
        self.scheduler = cosine_with_warmup(self.optimizer, int(recipe.warmup_epochs * steps_per_epoch),
                                            steps_per_epoch * recipe.epochs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=resolve_amp(amp, device) == "fp16" and device.type == "cuda")
        self.grad_clip = recipe.grad_clip

    def step(self, loss: torch.Tensor, model: torch.nn.Module, step: int) -> None:
        """Backward, (clip), update, advance the schedule; ``step`` counts steps since the stage began."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(model, step=step)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to validate and to save: the EMA when enabled, else ``model`` itself."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **({"ema": self.ema.module.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
