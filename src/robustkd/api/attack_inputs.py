"""The attack command's inputs: the model poisoned (a clean teacher run, or a new model
from scratch), the data and optimisation that mode implies, and the clean reference model a
learned trigger is optimised on."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from robustkd.api.context import RunContext
from robustkd.api.models import check_model_fits
from robustkd.data.dataset import DatasetSplits
from robustkd.errors import ConfigError
from robustkd.jobs import AttackJob, DataSpec, OptimSpec
from robustkd.models import build_model
from robustkd.runs import LoadedRun, load_teacher


def attack_source(job: AttackJob, run: RunContext) -> tuple[LoadedRun | None, DataSpec, OptimSpec]:
    """The teacher run poisoned (None from scratch), and the data and optimisation it
    implies: a teacher's data settings carry over, and each mode has its own defaults."""
    if (job.teacher is None) == (job.model is None):
        raise ConfigError("give either --teacher RUN_DIR (poison fine-tuning of a clean model) "
                          "or --model NAME (poisoning from scratch), not both or neither")
    if job.trigger_teacher is not None and job.teacher is not None:
        raise ConfigError("--trigger-teacher is for poisoning from scratch (--model); with "
                          "--teacher the trigger is learned on that teacher")
    d, o = job.data, job.optim
    if job.teacher is None:
        if d.dataset is None:
            raise ConfigError("--dataset is required when poisoning from scratch")
        return None, d, replace(o, epochs=o.epochs or 30, lr=o.lr or 0.1,
                                schedule=o.schedule or "step")
    parent = load_teacher(job.teacher, run.device, "--teacher", job.allow_partial)
    ds = parent.meta["dataset"]
    data = replace(d, dataset=d.dataset or ds["name"], data_root=d.data_root or ds.get("data_root"),
                   image_size=d.image_size or ds.get("resize"),
                   # poison the data the teacher was trained on
                   train_fraction=(parent.meta.get("train_fraction") if d.train_fraction is None
                                   else d.train_fraction),
                   holdout=d.holdout or ds.get("holdout"))
    return parent, data, replace(o, epochs=o.epochs or 8, lr=o.lr or 0.008,
                                 schedule=o.schedule or "constant")


def attack_models(job: AttackJob, run: RunContext, parent: LoadedRun | None,
            splits: DatasetSplits) -> tuple[nn.Module, nn.Module | None]:
    """The model poisoned, and the clean model a learned trigger is optimised on."""
    net = parent.model if parent else build_model(
        job.model, num_classes=splits.num_classes, in_channels=splits.train.channels).to(run.device)
    check_model_fits(net, splits, "teacher" if parent else "model")
    reference = parent.model if parent else None
    if job.trigger_teacher is not None:
        reference = load_teacher(job.trigger_teacher, run.device, "--trigger-teacher",
                                 job.allow_partial).model
        check_model_fits(reference, splits, "--trigger-teacher")
    if not 0 <= job.target < splits.num_classes:
        raise ConfigError(f"--target {job.target} is not a class of {splits.name} "
                          f"(0..{splits.num_classes - 1})")
    return net, reference
