"""Optimizers and the learning-rate schedule shared by every stage."""

from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3

from ..config import TrainConfig
from ..errors import NonFiniteTrainingError
from . import distributed as ddp
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


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Optimization:
    """Everything one optimizer step updates: the optimizer, the LR schedule, fp16 loss scaling and
    the optional EMA of the weights (validated, saved and handed on instead of the raw weights)."""

    def __init__(
        self, model: torch.nn.Module, recipe: TrainConfig, steps_per_epoch: int, amp: str, device: torch.device
    ):
        self.optimizer = create_optimizer(model, recipe)
        self.ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True) if recipe.ema_decay > 0 else None
        self.scheduler = cosine_with_warmup(
            self.optimizer, int(recipe.warmup_epochs * steps_per_epoch), steps_per_epoch * recipe.epochs
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=resolve_amp(amp, device) == "fp16")
        self.grad_clip = recipe.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, loss: torch.Tensor, model: torch.nn.Module, step: int) -> bool:
        """Backward, (clip), update, advance the schedule; ``step`` counts steps since the stage
        began. Returns False, without touching the weights, when the loss or a gradient is not
        finite: the one read back to the host per step (fp16's GradScaler makes the same one)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # true gradients for the norm (a no-op unless fp16)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # gradients are already all-reduced here, but a loss can be inf with finite gradients on one
        # rank alone: and-ing the flag over ranks keeps every rank's weights identical
        finite = bool(ddp.all_ranks_true(torch.isfinite(loss.detach()) & torch.isfinite(norm)))
        if finite:
            if self.grad_clip > 0:  # clipped only when finite: a skipped step keeps its gradients to report
                torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
            self.scaler.step(self.optimizer)
        self.scaler.update()  # fp16: a non-finite step lowers the loss scale, as the scaler's own skip does
        self.scheduler.step()  # the schedule follows the step count, skipped steps included (resume stays exact)
        if finite and self.ema is not None:
            self.ema.update(model, step=step)
        return finite

    def nonfinite_parameters(self, names: dict[torch.nn.Parameter, str], limit: int = 3) -> list[str]:
        """Names of the first parameters whose gradient is not finite (for the error message)."""
        return [names.get(p, "?") for p in self.params if p.grad is not None and not torch.isfinite(p.grad).all()][
            :limit
        ]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to validate and to save: the EMA when enabled, else ``model`` itself."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # fp16's loss scale and its growth tracker ({} when off)
            **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; stops a run that keeps producing them, since skipping
    then only hides a diverged model. A skipped step's forward pass has already updated the
    BatchNorm running statistics with its non-finite activations, so the model's buffers are
    copied before every forward and put back on a skip (one batched copy per step)."""

    def __init__(self, limit: int, model: torch.nn.Module):
        self.limit, self.in_a_row = limit, 0
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    def before_forward(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def passed(self) -> None:
        self.in_a_row = 0

    def skipped(self, where: str, detail: str) -> None:
        """``where``: "epoch E step S"; ``detail``: what was not finite."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteTrainingError(
                f"training stopped at {where}: {self.in_a_row} step(s) in a row had a non-finite loss or gradient "
                f"({detail}); the checkpoint of the last finished epoch is kept. Lower the learning rate, set "
                f"grad_clip, or try amp=off (max_nonfinite_steps sets how many are skipped first)"
            )
