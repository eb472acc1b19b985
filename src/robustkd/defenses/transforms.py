"""Teacher transforms: what turns a suspect teacher into what distillation uses.

One registry for both kinds, so the distill command names none of them:

* a *cleaning* transform returns a cleaned copy of the teacher, which any distillation
  method then reads: every teacher defence of :mod:`robustkd.defenses.registry`
  (fine-tuning, NAD, ANP, I-BAU), chosen by the ``defense`` setting;
* a *distilling* transform changes how the teacher is read and trains the student itself
  (RobustKD's detoxification, :mod:`robustkd.defenses.robustkd_transform`), chosen by the
  ``method`` setting; a method that names no transform is plain distillation.

Cleaning runs first (a cleaned copy can be detoxified too). Each transform saves its own
artifacts in the run directory and returns the fields it adds to the run's record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.defenses.registry import (
    TEACHER_DEFENSES,
    DefenseContext,
    defend_teacher,
    get_teacher_defense,
    make_settings,
)
from robustkd.distill.run import DistillRun
from robustkd.errors import ConfigError
from robustkd.training.loop_settings import LoopSettings

# the distill settings that choose a transform, in the order the transforms run, with the
# noun an unknown name is reported with (None: a name that is no transform is a
# distillation method, which the distillation checks itself)
CHOOSERS: dict[str, str | None] = {"defense": "teacher defence", "method": None}


@dataclass
class TransformContext:
    """What a transform may use: the models, the defender's clean data, the distillation's
    loop settings and run (schedule, trigger and target, checkpoints), the distill job's
    flat settings and the run directory. ``test``/``run.trigger`` are for reporting only,
    never for choosing settings."""

    teacher: nn.Module
    student: nn.Module
    clean: ImageDataset
    test: ImageDataset
    loop: LoopSettings
    run: DistillRun
    settings: Mapping[str, Any]
    run_dir: Path
    new_student: Callable[[], nn.Module] | None = None  # a fresh student, for candidates

    def defense_context(self) -> DefenseContext:
        return DefenseContext.for_run(self.clean, self.test, self.loop, self.run,
                                      self.settings.get("teacher_layers"))


@dataclass
class Transformed:
    """A transform's result: the teacher distillation reads next, the record fields it adds,
    and a line for the run's log."""

    teacher: nn.Module
    extras: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


class TeacherTransform(Protocol):
    """``chosen_by``: the distill setting naming it; ``options_key``: the setting holding its
    settings; ``distils_with``: the distillation method whose settings (``options``) its own
    distillation takes, ``None`` for a cleaning transform."""

    name: str
    chosen_by: str
    options_key: str
    distils_with: str | None

    def check(self, options: Mapping[str, Any] | None) -> Any:
        """Its settings from ``options``, checked (raises :class:`ConfigError`)."""

    def unchosen(self, settings: Mapping[str, Any]) -> str:
        """The error when its settings are given but it is not chosen."""

    def __call__(self, ctx: TransformContext) -> Transformed: ...


TRANSFORMS: dict[str, TeacherTransform] = {}


def register_transform(transform: TeacherTransform) -> TeacherTransform:
    TRANSFORMS[transform.name] = transform
    return transform


@dataclass(frozen=True)
class CleanedCopy:
    """A teacher defence as a transform: distillation reads the defence's cleaned copy
    (saved in the run and reused by ``--resume``, see :func:`defend_teacher`)."""

    name: str
    chosen_by: ClassVar[str] = "defense"
    options_key: ClassVar[str] = "defense_options"
    distils_with: ClassVar[str | None] = None

    def check(self, options: Mapping[str, Any] | None) -> Any:
        return make_settings(get_teacher_defense(self.name), options)

    def unchosen(self, settings: Mapping[str, Any]) -> str:
        return f"defence settings need a defence (--defense {'|'.join(sorted(TEACHER_DEFENSES))})"

    def __call__(self, ctx: TransformContext) -> Transformed:
        cleaned, report = defend_teacher(
            self.name, ctx.teacher, ctx.defense_context(), ctx.settings.get(self.options_key),
            run_dir=ctx.run_dir, resume=ctx.run.resume)
        return Transformed(cleaned, {"defense": report, "defense_seconds": report["seconds"]},
                           f"defence {self.name}: cleaned teacher "
                           f"{report['cleaned_teacher_metrics']}")


def teacher_transforms() -> dict[str, TeacherTransform]:
    """Every transform by name: each registered teacher defence, then the others."""
    return {**{name: CleanedCopy(name) for name in TEACHER_DEFENSES}, **TRANSFORMS}


def transform_names(chosen_by: str) -> list[str]:
    return [n for n, t in teacher_transforms().items() if t.chosen_by == chosen_by]


def get_transform(name: str) -> TeacherTransform:
    transforms = teacher_transforms()
    if name not in transforms:
        raise ConfigError(f"unknown teacher transform {name!r}; available: "
                          f"{sorted(transforms)}")
    return transforms[name]


def find_transform(chosen_by: str, name: str | None) -> TeacherTransform | None:
    """The transform ``name`` among those the setting ``chosen_by`` chooses, else None."""
    found = teacher_transforms().get(name) if name is not None else None
    return found if found is not None and found.chosen_by == chosen_by else None


def chosen_transform(chooser: str, settings: Mapping[str, Any]) -> TeacherTransform | None:
    """The transform the distill setting ``chooser`` names in ``settings`` (None: none).
    An unknown name is an error where every name is a transform, and so are the settings of
    a transform that is not chosen."""
    name = settings.get(chooser)
    transform = find_transform(chooser, name)
    if transform is not None:
        return transform
    if name is not None and CHOOSERS[chooser] is not None:
        raise ConfigError(f"unknown {CHOOSERS[chooser]} {name!r}; available: "
                          f"{sorted(transform_names(chooser))}")
    for other in teacher_transforms().values():
        if other.chosen_by == chooser and settings.get(other.options_key):
            raise ConfigError(other.unchosen(settings))
    return None


def with_teacher(ctx: TransformContext, teacher: nn.Module) -> TransformContext:
    """``ctx`` with the teacher an earlier transform returned."""
    return dataclasses.replace(ctx, teacher=teacher)
