"""Train a student from a teacher with any registered method, on the one training loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader, GroupedLoader
from robustkd.data.streaming import StreamedImageFolder, loader_for
from robustkd.distill.base import Distiller, DistillSetup, get_method
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.models.folded import FoldedTeacher
from robustkd.models.layers import frozen_teacher, layers_of
from robustkd.models.taps import Replacement
from robustkd.training.loop import EpochResult, fit
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig
from robustkd.triggers import Trigger

# FKD's CIFAR schedule: SGD nesterov, momentum 0.9, wd 5e-4, lr 0.1, /10 at 50% and 75%.
FKD_SCHEDULE = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True,
                           schedule="step", milestones=(0.5, 0.75))


def build_distiller(method: str, teacher: nn.Module, student: nn.Module, *,
                    teacher_layers: Sequence[str] | None = None,
                    student_layers: Sequence[str] | None = None,
                    options: Mapping[str, Any] | None = None,
                    teacher_replace: Mapping[str, Replacement] | None = None,
                    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    logit_teacher: nn.Module | None = None) -> Distiller:
    """The method's distiller; a :class:`FoldedTeacher` hands it all its copies (the first
    read by default, :meth:`Distiller.use_teacher` picks another)."""
    cls = get_method(method)
    needs_layers = method not in ("ce", "kd")
    teachers = list(teacher.copies) if isinstance(teacher, FoldedTeacher) else [teacher]
    if len(teachers) > 1 and teacher_replace:
        raise ConfigError("a cross-fitted teacher (--defense crossfit) is distilled as it is: "
                          "RobustKD's detoxification does not apply to it")
    setup = DistillSetup(
        teacher=teachers[0], student=student,
        teacher_layers=layers_of(teachers[0], teacher_layers) if needs_layers else [],
        student_layers=layers_of(student, student_layers) if needs_layers else [],
        options=dict(options or {}), teacher_replace=dict(teacher_replace or {}),
        student_input=student_input, logit_teacher=logit_teacher, teachers=teachers)
    return cls(setup)


def _fold_loader(teacher: nn.Module, train: ImageDataset | StreamedImageFolder,
                 **kwargs: Any) -> DeviceLoader | None:
    """For a cross-fitted teacher, batches of one fold each (else None)."""
    if not isinstance(teacher, FoldedTeacher):
        return None
    if not isinstance(train, ImageDataset):
        raise ConfigError("a cross-fitted teacher (--defense crossfit) needs in-memory data: "
                          "its folds are rows of the defender's images")
    if len(teacher.folds) != len(train):
        raise ConfigError(f"the cross-fitted teacher's folds cover {len(teacher.folds)} images "
                          f"but distillation reads {len(train)}: distil on the images it was "
                          "cleaned on")
    loader = GroupedLoader(train, groups=teacher.folds, **kwargs)
    if len(loader) == 0:
        raise ConfigError(f"every fold of the {len(train)} clean images is smaller than a "
                          f"batch ({kwargs['batch_size']}): lower --batch-size or give more "
                          "clean images (--clean-fraction)")
    return loader


@dataclass(frozen=True)
class DistillRun:
    """One distillation's schedule, what its evaluated epochs measure (ACC, and ASR when
    ``trigger``/``target`` are known) and its checkpoints; beside :class:`LoopSettings`."""

    epochs: int = 200
    optim: OptimConfig = field(default_factory=lambda: FKD_SCHEDULE)
    eval_every: int = 1
    trigger: Trigger | None = None
    target: int | None = None
    state_dir: str | Path | None = None
    resume: bool = False
    on_epoch_end: Callable[[EpochResult], None] | None = None


def distill_student(
    teacher: nn.Module,
    student: nn.Module,
    train: ImageDataset | StreamedImageFolder,
    test: ImageDataset | StreamedImageFolder | None = None,
    *,
    loop: LoopSettings,
    run: DistillRun = DistillRun(),
    method: str = "fkd",
    teacher_layers: Sequence[str] | None = None,
    student_layers: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    teacher_replace: Mapping[str, Replacement] | None = None,
    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    logit_teacher: nn.Module | None = None,
) -> tuple[list[EpochResult], Distiller]:
    """Distil ``teacher`` into ``student`` on ``train`` (the defender's clean data).

    The teacher is frozen (and left unchanged); ``teacher_replace`` stays active in its
    forward passes. Each evaluated epoch records the student's test ACC and, when a trigger
    is known, its ASR. ``logit_teacher`` (frozen in eval mode) is the model a method's logit
    term reads instead of the teacher. ``train``/``test`` may be streamed from disk
    (decoded by the loop's ``workers`` processes; their own transform replaces ``augment``).
    """
    mean, std, batch_size, seed, workers = (loop.mean, loop.std, loop.batch_size, loop.seed,
                                            loop.workers)
    epochs, eval_every = run.epochs, run.eval_every
    device = torch.device(loop.device)
    distiller = build_distiller(method, teacher, student, teacher_layers=teacher_layers,
                                student_layers=student_layers, options=options,
                                teacher_replace=teacher_replace, student_input=student_input,
                                logit_teacher=logit_teacher)
    batches = {"device": device, "mean": mean, "std": std, "shuffle": True,
               "augment": loop.augment, "drop_last": len(train) > batch_size, "seed": seed,
               "channels_last": loop.channels_last}
    folds = _fold_loader(teacher, train, batch_size=batch_size, **batches)
    loader = (folds if folds is not None
              else loader_for(train, batch_size, workers=workers, **batches))
    # the distiller's hooks live for the run and are removed with it
    logits_frozen = (frozen_teacher(logit_teacher, "eval") if logit_teacher is not None
                     else nullcontext())
    with frozen_teacher(teacher, distiller.teacher_mode()), logits_frozen, closing(distiller):
        # one batch to size connectors/margins: decoded in this process (workers=0) rather
        # than by a pool that would prefetch several batches only to be thrown away
        probe = next(iter(loader_for(train, min(batch_size, len(train)), device=device,
                                     mean=mean, std=std, shuffle=True, seed=seed,
                                     workers=0)))[0]
        distiller.prepare(probe)
        distiller.to(device)
        distiller.total_steps = epochs * len(loader)

        def epoch_end(result: EpochResult) -> None:
            if test is not None and eval_every and (result.epoch % eval_every == 0
                                                    or result.epoch == epochs):
                metrics = evaluate_model(student, test, mean, std, trigger=run.trigger,
                                         target=run.target, device=device,
                                         batch_size=max(batch_size, 256), workers=workers)
                result.extra.update({f"test_{k}": v for k, v in metrics.items()})
            if run.on_epoch_end is not None:
                run.on_epoch_end(result)

        params = list(student.parameters()) + list(distiller.parameters())
        # the taps are registered once (PersistentTap), so one compiled graph serves every step
        loss = torch.compile(distiller.loss) if loop.compile else distiller.loss

        def step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
            if folds is not None:  # each batch from the copy that never saw its fold
                distiller.use_teacher(folds.group_of(idx))
            return loss(x, y)

        history = fit(params, step, loader, epochs, run.optim,
                      train_modules=[student, distiller],
                      state_modules={"student": student, "distiller": distiller},
                      device=device, amp=loop.amp, on_epoch_end=epoch_end,
                      state_dir=run.state_dir, resume=run.resume, progress=loop.progress,
                      desc=f"distill {method}")
    return history, distiller

