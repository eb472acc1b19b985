"""Teacher defences: clean a copy of a suspect teacher before distillation (METHOD.md 5.7).

A teacher defence maps (suspect teacher, the defender's clean subset) to a *cleaned copy*
of the teacher plus a report; the original teacher is never modified. Distillation then
runs from the copy with any method (``robustkd distill --defense NAME --method fkd``), so
the baselines share the CLI, the run directory and the record of plain distillation.

A defence is registered with a settings dataclass whose defaults come from its paper;
settings are never chosen with test ASR (a defender has no trigger).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.io import load_state_dict, read_json, save_tensors, write_json
from robustkd.models.folded import FoldedTeacher
from robustkd.settings import make_settings as settings_from
from robustkd.triggers import Trigger

if TYPE_CHECKING:
    from robustkd.distill.run import DistillRun
    from robustkd.training.loop_settings import LoopSettings

DEFENDED_TEACHER = "defended_teacher.safetensors"
DEFENSE_JSON = "defense.json"


@dataclass
class DefenseContext:
    """What a defence may use: the clean subset and how to feed it. ``test``/``trigger`` are
    only for reporting the cleaned teacher's metrics, never for choosing settings."""

    clean: ImageDataset
    mean: Sequence[float]
    std: Sequence[float]
    augment: dict | None = None
    device: torch.device | str = "cpu"
    seed: int = 0
    layers: Sequence[str] | None = None
    test: ImageDataset | None = None
    trigger: Trigger | None = None
    target: int | None = None
    amp: bool = True
    channels_last: bool = False
    progress: bool = True

    def loader(self, batch_size: int) -> DeviceLoader:
        """Shuffled, augmented batches of the clean subset (the teacher's own augmentation,
        so fine-tuning does not remove an augmentation-fragile backdoor for free)."""
        return DeviceLoader(self.clean, batch_size, device=self.device, mean=self.mean,
                            std=self.std, shuffle=True, augment=self.augment,
                            drop_last=len(self.clean) > batch_size, seed=self.seed,
                            channels_last=self.channels_last)

    @classmethod
    def for_run(cls, clean: ImageDataset, test: ImageDataset | None, loop: LoopSettings,
                run: DistillRun, layers: Sequence[str] | None = None) -> DefenseContext:
        """The context a distillation run gives its teacher defence: its clean data, loop
        settings, and the trigger it reports the cleaned teacher's ASR with."""
        return cls(clean=clean, mean=loop.mean, std=loop.std, augment=loop.augment,
                   device=loop.device, seed=loop.seed, layers=layers, test=test,
                   trigger=run.trigger, target=run.target, amp=loop.amp,
                   channels_last=loop.channels_last, progress=loop.progress)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Test ACC (and ASR when the trigger is known) of a model, for the report."""
        if self.test is None:
            return None
        return evaluate_model(model, self.test, self.mean, self.std, trigger=self.trigger,
                              target=self.target, device=self.device)


DefenseFn = Callable[[nn.Module, DefenseContext, Any], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class TeacherDefense:
    """A registered defence: its settings dataclass and the function that runs it."""

    name: str
    settings: type
    run: DefenseFn
    help: str = ""
    # raised when a fix changes what the defence computes under the same settings, so
    # benchmark plans name new runs instead of taking the old records for current ones
    revision: int = 1
    # False: its result serves distillation only (a cross-fitted teacher is tied to the
    # defender's images), so ``robustkd defend`` cannot save it as a model
    standalone: bool = True


TEACHER_DEFENSES: dict[str, TeacherDefense] = {}


def register_teacher_defense(name: str, settings: type, help: str = "",
                             revision: int = 1, standalone: bool = True
                             ) -> Callable[[DefenseFn], DefenseFn]:
    """Decorator: register ``fn(teacher, ctx, settings) -> (cleaned_copy, details)``."""

    def deco(fn: DefenseFn) -> DefenseFn:
        TEACHER_DEFENSES[name] = TeacherDefense(name, settings, fn, help, revision, standalone)
        return fn

    return deco


def get_teacher_defense(name: str) -> TeacherDefense:
    if name not in TEACHER_DEFENSES:
        raise ConfigError(f"unknown teacher defence {name!r}; available: "
                          f"{sorted(TEACHER_DEFENSES)}")
    return TEACHER_DEFENSES[name]


def make_settings(spec: TeacherDefense, options: Mapping[str, Any] | None) -> Any:
    """The defence's settings from its defaults plus ``options`` (checked, see settings.py)."""
    return settings_from(spec.settings, options, f"defence {spec.name}", flags=spec.name)


def trainable_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients on, so training it cannot touch the original."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def defend_teacher(name: str, teacher: nn.Module, ctx: DefenseContext,
                   options: Mapping[str, Any] | None = None, *,
                   run_dir: str | Path | None = None,
                   resume: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Run defence ``name`` on a copy of ``teacher``; return the cleaned copy and a report.

    The report holds the defence's name, its settings, its wall time, the cleaned teacher's
    test metrics (``cleaned_teacher_metrics``: ACC, and ASR when the trigger is known) and
    the defence's own details. With ``run_dir`` the cleaned weights and the report are
    saved there; ``resume`` reuses them when the settings match (so a resumed distillation
    does not redo the defence).
    """
    spec = get_teacher_defense(name)
    settings = make_settings(spec, options)
    settings_dict = dataclasses.asdict(settings)
    if run_dir is not None and resume:
        reused = _load_saved(Path(run_dir), teacher, name, settings_dict)
        if reused is not None:
            return reused
    started = time.perf_counter()
    cleaned, details = spec.run(teacher, ctx, settings)
    seconds = time.perf_counter() - started
    cleaned.eval()
    report = {"name": name, "settings": settings_dict, "seconds": seconds,
              "cleaned_teacher_metrics": ctx.evaluate(cleaned), **details}
    if run_dir is not None:
        save_tensors(Path(run_dir) / DEFENDED_TEACHER, cleaned.state_dict())
        write_json(Path(run_dir) / DEFENSE_JSON, report)
    return cleaned, report


def load_defended(run_dir: str | Path, teacher: nn.Module, name: str,
                  options: Mapping[str, Any] | None = None
                  ) -> tuple[nn.Module, dict[str, Any]] | None:
    """The copy of ``teacher`` that defence ``name`` with ``options`` saved in ``run_dir``
    and its report, or None when there is none with these settings."""
    settings = dataclasses.asdict(make_settings(get_teacher_defense(name), options))
    return _load_saved(Path(run_dir), teacher, name, settings)


def _load_saved(run_dir: Path, teacher: nn.Module, name: str,
                settings: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]] | None:
    weights, meta = run_dir / DEFENDED_TEACHER, run_dir / DEFENSE_JSON
    if not (weights.exists() and meta.exists()):
        return None
    report = read_json(meta)
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    if report.get("name") != name or report.get("settings") != saved:
        return None
    folded = report.get("folded")
    cleaned = (FoldedTeacher.like(teacher, folded["copies"], folded["rows"]) if folded
               else copy.deepcopy(teacher))
    cleaned.load_state_dict(load_state_dict(weights))
    return cleaned.eval(), {**report, "reused": True}
