"""What every distillation method shares: layer pairing, teacher handling, the registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.taps import FeatureTap, PersistentTap, Replacement
from robustkd.settings import make_settings, settings_dict


@dataclass
class DistillSetup:
    """The inputs a method needs besides data: both networks, their layers, and options.

    ``teacher_replace`` maps teacher module names to output replacements that stay active
    inside every teacher forward pass (RobustKD's detox masks are such replacements).
    ``student_input`` (e.g. synthetic triggers) changes only what the student sees; it may
    also append rows (perturbed copies of the batch's first rows), which FKD trains on their
    labels alone. ``logit_teacher``, when set, is the model a method's logit term reads
    instead of the teacher (frozen in eval mode; ``teacher_replace`` does not apply to it).
    ``teachers``, when given, are interchangeable copies of ``teacher`` (the first is
    ``teacher``) of which each batch reads one (:meth:`Distiller.use_teacher`): a
    cross-fitted teacher's.
    """

    teacher: nn.Module
    student: nn.Module
    teacher_layers: list[DistillLayer]
    student_layers: list[DistillLayer]
    options: dict[str, Any] = field(default_factory=dict)
    teacher_replace: Mapping[str, Replacement] = field(default_factory=dict)
    # transforms the (normalised) batch the student sees; the teacher sees the original
    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    logit_teacher: nn.Module | None = None
    teachers: Sequence[nn.Module] = ()


@dataclass(frozen=True)
class NoSettings:
    """A method without settings."""


class Distiller(nn.Module):
    """A distillation method: trainable extras (e.g. connectors) plus the student's loss."""

    name = "base"
    settings: type = NoSettings  # the method's settings dataclass: its defaults live there
    reads_teacher = True  # False: the student never sees the teacher (one student serves all)

    def __init__(self, setup: DistillSetup) -> None:
        super().__init__()
        self.setup = setup
        self.options = settings_dict(make_settings(self.settings, setup.options,
                                                   f"method {self.name}", flags=self.name))
        # Not registered as submodules: the distiller's own parameters are only its extras.
        object.__setattr__(self, "teacher", setup.teacher)
        object.__setattr__(self, "student", setup.student)
        object.__setattr__(self, "_taps", {})
        object.__setattr__(self, "teachers", list(setup.teachers) or [setup.teacher])
        if self.teachers[0] is not setup.teacher:
            raise ConfigError("DistillSetup.teachers must start with DistillSetup.teacher")
        self.active_teacher = 0
        # optimizer steps of the whole run, set by the loop before training (a method whose
        # loss changes along the schedule reads it)
        self.total_steps: int | None = None

    def taps(self, model: nn.Module, capture: Sequence[str] = (),
             replace: Mapping[str, Replacement] | None = None) -> PersistentTap:
        """The run's hooks on ``model`` for these layers: registered at the first step, kept
        until :meth:`close` (a step then adds and removes no hooks)."""
        key = (id(model), tuple(capture), id(replace))
        if key not in self._taps:
            self._taps[key] = PersistentTap(model, capture, replace=replace)
        return self._taps[key]

    def close(self) -> None:
        """Remove every hook the run registered."""
        for taps in self._taps.values():
            taps.close()
        self._taps.clear()

    def use_teacher(self, k: int) -> None:
        """Read copy ``k`` of :attr:`teachers` from the next step on."""
        self.active_teacher = k
        object.__setattr__(self, "teacher", self.teachers[k])

    def prepare(self, probe: torch.Tensor) -> None:
        """Called once with a batch before training (shapes, margins)."""

    def teacher_mode(self) -> str:
        """``train`` (BN on batch statistics, as FKD) or ``eval``."""
        return "eval"

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def teacher_forward(self, x: torch.Tensor, capture: Sequence[str] = ()
                        ) -> tuple[torch.Tensor, FeatureTap]:
        """Teacher logits (and captured features) with the replacements active, no gradient."""
        taps = self.taps(self.teacher, capture, self.setup.teacher_replace)
        with torch.no_grad(), taps.recording() as t:
            logits = self.teacher(x)
        return logits, t

    def logit_teacher_forward(self, x: torch.Tensor,
                              teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The logits a logit term reads: those of ``setup.logit_teacher`` when one is given,
        else the teacher's (``teacher_logits`` when the step already computed them)."""
        if self.setup.logit_teacher is not None:
            with torch.no_grad():
                return self.setup.logit_teacher(x)
        return teacher_logits if teacher_logits is not None else self.teacher_forward(x)[0]


METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Distiller]:
    if name not in METHODS:
        raise ConfigError(f"unknown distillation method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


OptionParser = Callable[[str], Any]
