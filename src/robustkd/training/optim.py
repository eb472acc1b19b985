"""Optimisers and learning-rate schedules, chosen by name from registries."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from robustkd.errors import ConfigError


@dataclass
class OptimConfig:
    """Everything the training loop needs to build an optimiser and its schedule.

    ``milestones`` are fractions of the total epochs (FKD's CIFAR schedule divides the
    learning rate by 10 at 50% and 75%).
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0


OPTIMIZERS: dict[str, Callable[[list, OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
        nesterov=c.nesterov and c.momentum > 0),
    "adam": lambda params, c: torch.optim.Adam(
        params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(
        params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
}


def _step_factor(progress: float, cfg: OptimConfig) -> float:
    passed = sum(1 for m in cfg.milestones if progress >= m - 1e-9)
    return cfg.gamma ** passed


SCHEDULES: dict[str, Callable[[float, OptimConfig], float]] = {
    "step": _step_factor,
    "cosine": lambda progress, cfg: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))),
    "constant": lambda progress, cfg: 1.0,
}


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.name!r}; choose one of {sorted(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose one of {sorted(SCHEDULES)}")
    params = list(params)
    if not params:
        raise ConfigError("nothing to optimise: the parameter list is empty")
    opt = OPTIMIZERS[cfg.name](params, cfg)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def lr_factor(epoch: int, step: int, steps_per_epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Multiplier of the initial learning rate at a given step.

    The step schedule changes at epoch boundaries (as in the papers); cosine and warm-up
    move every iteration.
    """
    if cfg.schedule == "step":
        progress = epoch / max(epochs, 1)
    else:
        progress = (epoch + step / max(steps_per_epoch, 1)) / max(epochs, 1)
    factor = SCHEDULES[cfg.schedule](progress, cfg)
    if cfg.warmup_epochs > 0:
        done = epoch + step / max(steps_per_epoch, 1)
        factor *= min(1.0, (done + 1.0 / max(steps_per_epoch, 1)) / cfg.warmup_epochs)
    return factor


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor
