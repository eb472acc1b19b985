"""The distill command's inputs: the teacher (a run, or a user model with its weights), the
defender's clean data (as the teacher run implies: in memory or streamed) and the student."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from robustkd.api.context import RunContext
from robustkd.api.data import (
    IN_MEMORY_HINT,
    not_streamable,
    prepare_data,
    prepare_streamed,
    streaming,
)
from robustkd.api.models import check_output_classes, load_factory, load_weights_into
from robustkd.data.dataset import DatasetSplits, ImageDataset
from robustkd.data.streaming import StreamedImageFolder
from robustkd.data.subsets import split_validation
from robustkd.errors import ConfigError
from robustkd.jobs import DataSpec, DistillJob
from robustkd.models import build_model
from robustkd.runs import load_run, load_teacher
from robustkd.triggers import Trigger

STREAMED_METHODS = ("fkd", "kd", "ce")  # distillation that only reads (x, y) batches


@dataclass
class Teacher:
    """The suspect teacher, the trigger its ASR is measured with (when known), and its run's
    meta (None for a factory teacher)."""

    net: nn.Module | None
    trigger: Trigger | None = None
    target: int | None = None
    meta: dict[str, Any] | None = None


def load_teacher_run(job: DistillJob, device: torch.device) -> tuple[Teacher, DataSpec]:
    """The teacher run (a factory teacher is built once the data are known) and the data
    settings it implies: a teacher run's dataset, folder, size and holdout carry over."""
    if (job.teacher is None) == (job.teacher_factory is None):
        raise ConfigError("give either --teacher RUN_DIR or --teacher-factory MODULE:FUNC "
                          "with --teacher-weights FILE")
    d = job.data
    if job.teacher is None:
        if d.dataset is None or job.teacher_weights is None:
            raise ConfigError("a factory teacher needs --teacher-weights FILE and --dataset NAME")
        return Teacher(None), d
    parent = load_teacher(job.teacher, device, "--teacher", job.allow_partial)
    ds = parent.meta["dataset"]
    data = replace(d, dataset=d.dataset or ds["name"], data_root=d.data_root or ds.get("data_root"),
                   image_size=d.image_size or ds.get("resize"),
                   holdout=d.holdout or ds.get("holdout"))
    return Teacher(parent.model, parent.trigger, parent.target, parent.meta), data


def defender_seed(job: DistillJob) -> int:
    """The seed choosing the defender's images (and their validation share): ``clean_seed``,
    else the run's seed."""
    return job.runtime.seed if job.clean_seed is None else job.clean_seed


def clean_data(job: DistillJob, run: RunContext, teacher: Teacher,
               data: DataSpec) -> tuple[DatasetSplits, Any]:
    """The splits and the defender's clean subset (``clean_fraction`` per class, chosen by
    ``clean_seed``: fixed across student seeds)."""
    subset_seed = defender_seed(job)
    if streaming(data.dataset, data.stream, teacher.meta):
        run.config["stream"] = True
        check_streamed_distill(job.method, job.defense)
        return prepare_streamed(data.dataset, data.data_root, data.image_size,
                                job.clean_fraction, subset_seed, data.holdout,
                                teacher.meta["normalization"] if teacher.meta else None)
    for key in ("stream", "workers"):  # in-memory records keep their former config
        run.config.pop(key)
    return prepare_data(data.dataset, data.data_root, data.image_size, job.clean_fraction,
                        subset_seed, holdout=data.holdout)


def validation_split(job: DistillJob, splits: Any, clean: ImageDataset | StreamedImageFolder
                     ) -> tuple[Any, Any]:
    """With ``clean_val``: the clean images minus a per-class validation share, and splits
    whose evaluation set is that share, so settings are compared without the test set."""
    if job.clean_val is None:
        return splits, clean
    if isinstance(clean, StreamedImageFolder):
        raise not_streamable("--clean-val", "the validation share is carved from in-memory "
                                            f"clean data; {IN_MEMORY_HINT}")
    train, val = split_validation(clean, job.clean_val, seed=defender_seed(job))
    return replace(splits, test=val), train


def check_streamed_distill(method: str, defense: str | None) -> None:
    """Streamed distillation covers the baselines that only read ``(x, y)`` batches; the
    teacher transforms (detox masks, trigger synthesis, defences) keep the clean subset in
    memory."""
    if method not in STREAMED_METHODS:
        raise not_streamable(
            f"--method {method}",
            f"its detoxification and trigger synthesis work on an in-memory clean subset; "
            f"streamed distillation supports --method {', '.join(STREAMED_METHODS)}; for "
            f"{method}, {IN_MEMORY_HINT}")
    if defense is not None:
        raise not_streamable(
            f"--defense {defense}",
            f"teacher defences clean the teacher on an in-memory clean subset; {IN_MEMORY_HINT}")


def finish_teacher(job: DistillJob, teacher: Teacher, splits: DatasetSplits,
                   device: torch.device) -> None:
    """Build a factory teacher with its weights, take ``trigger_from``'s trigger, and check
    the teacher classifies the dataset's classes."""
    if job.teacher_factory is not None:
        teacher.net = load_factory(job.teacher_factory, splits.num_classes,
                                   splits.train.channels)
        load_weights_into(teacher.net, job.teacher_weights, job.allow_pickle, "teacher")
        teacher.net.to(device)
    if job.trigger_from is not None:
        other = load_run(job.trigger_from, device)
        teacher.trigger, teacher.target = other.trigger, other.target
    check_output_classes(teacher.net, splits, "teacher", device)


def build_student(job: DistillJob, splits: DatasetSplits) -> nn.Module:
    """A fresh student: a registered architecture or the user's factory."""
    if (job.student is None) == (job.student_factory is None):
        raise ConfigError("give either --student NAME or --student-factory MODULE:FUNC")
    if job.student_factory is None:
        return build_model(job.student, num_classes=splits.num_classes,
                           in_channels=splits.train.channels)
    return load_factory(job.student_factory, splits.num_classes, splits.train.channels)
