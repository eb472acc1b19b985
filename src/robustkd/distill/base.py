"""What every distillation method shares: layer pairing, teacher handling, the registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.taps import Replacement, resolve_modules, tap


def layers_of(model: nn.Module, names: Sequence[str] | None = None) -> list[DistillLayer]:
    """Distillation layers of a model: the given module names, else the model's declaration.

    A user-named module is its own stage and pre-ReLU point; if it is a BatchNorm its affine
    parameters give FKD's margins, otherwise margins are estimated on clean data.
    """
    if names:
        modules = resolve_modules(model, names)
        return [DistillLayer(stage=n, prerelu=n,
                             bn=n if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
                for n, m in modules.items()]
    if hasattr(model, "distill_layers"):
        return list(model.distill_layers())
    raise ConfigError(f"{type(model).__name__} does not declare distillation layers; name them "
                      "(API: teacher_layers=[...], CLI: --teacher-layers a,b,c)")


@dataclass
class DistillSetup:
    """The inputs a method needs besides data: both networks, their layers, and options.

    ``teacher_replace`` maps teacher module names to output replacements that stay active
    inside every teacher forward pass (RobustKD's detox masks are such replacements).
    ``student_input`` (e.g. synthetic triggers) changes only what the student sees.
    """

    teacher: nn.Module
    student: nn.Module
    teacher_layers: list[DistillLayer]
    student_layers: list[DistillLayer]
    options: dict[str, Any] = field(default_factory=dict)
    teacher_replace: Mapping[str, Replacement] = field(default_factory=dict)
    # transforms the (normalised) batch the student sees; the teacher sees the original
    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None


class Distiller(nn.Module):
    """A distillation method: trainable extras (e.g. connectors) plus the student's loss."""

    name = "base"
    defaults: dict[str, Any] = {}

    def __init__(self, setup: DistillSetup) -> None:
        super().__init__()
        self.setup = setup
        self.options = {**self.defaults, **setup.options}
        unknown = set(setup.options) - set(self.defaults)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no option(s) {sorted(unknown)}; "
                              f"it takes {sorted(self.defaults) or 'none'}")
        # Not registered as submodules: the distiller's own parameters are only its extras.
        object.__setattr__(self, "teacher", setup.teacher)
        object.__setattr__(self, "student", setup.student)

    def prepare(self, probe: torch.Tensor) -> None:
        """Called once with a batch before training (shapes, margins)."""

    def teacher_mode(self) -> str:
        """``train`` (BN on batch statistics, as FKD) or ``eval``."""
        return "eval"

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def teacher_forward(self, x: torch.Tensor, capture: Sequence[str] = ()):
        """Teacher logits (and captured features) with the replacements active, no gradient."""
        with torch.no_grad(), tap(self.teacher, capture, replace=self.setup.teacher_replace) as t:
            logits = self.teacher(x)
        return logits, t


@contextmanager
def frozen_teacher(teacher: nn.Module, mode: str):
    """Teacher in ``mode`` with gradients off; in train mode BN uses batch statistics but its
    running statistics are left untouched (momentum 0), so the teacher is not altered."""
    if mode not in ("train", "eval"):
        raise ConfigError(f"teacher BN mode must be 'train' or 'eval', got {mode!r}")
    was_training = teacher.training
    grads = [(p, p.requires_grad) for p in teacher.parameters()]
    bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
               for m in bns]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        teacher.train(mode == "train")
        for m in bns:
            m.momentum = 0.0
        yield teacher
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, momentum, count in zip(bns, momenta, tracked, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
        teacher.train(was_training)


METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Distiller]:
    if name not in METHODS:
        raise ConfigError(f"unknown distillation method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


OptionParser = Callable[[str], Any]
