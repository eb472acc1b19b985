"""``robustkd distill``: a student from a (possibly backdoored) teacher on clean data.

What turns the suspect teacher into what distillation reads (a teacher defence's cleaned
copy, RobustKD's detoxification) comes from the teacher-transform registry
(:mod:`robustkd.defenses.transforms`); this module names none of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.api.context import RunContext, job_config, log, throughput
from robustkd.api.distill_inputs import (
    build_student,
    clean_data,
    finish_teacher,
    load_teacher_run,
    validation_split,
)
from robustkd.api.models import check_output_classes, prepare_model
from robustkd.defenses.transforms import TransformContext, chosen_transform, with_teacher
from robustkd.distill import DistillRun, distill_student
from robustkd.evaluation.metrics import evaluate_model
from robustkd.jobs import DistillJob, from_job
from robustkd.outputs import STATE_DIR
from robustkd.runs import run_meta, save_run_model
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig
from robustkd.utils import resolve_device, seed_everything


@from_job(DistillJob)
def distill(job: DistillJob) -> dict[str, Any]:
    """Distil a (possibly backdoored) teacher into a student on clean data.

    The teacher is a run directory (``teacher``) or a user model (``teacher_factory`` +
    ``teacher_weights`` [+ ``teacher_layers``]); the student a registered name or a factory.
    Records the student's ACC and, when the teacher's trigger is known, its ASR. ``defense``
    (``finetune``, ``nad``) first cleans a copy of the teacher on the clean data
    (``defense_options``: its settings) and distils from that copy.

    ``stream`` (on by itself for ``imagenet`` and for a teacher run that streamed) decodes
    the data from disk in ``workers`` processes; then only ``fkd``, ``kd`` and ``ce`` run
    (no RobustKD, no defence) and ``image_size`` is the crop size.
    """
    return run_distill(job)


def run_distill(job: DistillJob) -> dict[str, Any]:
    """:func:`distill` for a job already built."""
    r = job.runtime
    config = job_config(job)
    for key in ("clean_seed", "clean_val"):  # records without them keep their former config
        if getattr(job, key) is None:
            config.pop(key)
    run = RunContext("distill", config, Path(job.out), r.seed)
    run.open(resume=r.resume, overwrite=r.overwrite,
             inputs={"--teacher": job.teacher, "--trigger-from": job.trigger_from,
                     "--detox-from": job.detox_from})
    seed_everything(r.seed)
    run.device = dev = resolve_device(r.device)
    teacher, data = load_teacher_run(job, dev)
    splits, clean = clean_data(job, run, teacher, data)
    splits, clean = validation_split(job, splits, clean)
    finish_teacher(job, teacher, splits, dev)
    student = build_student(job, splits)
    use_cl = prepare_model(student, dev, r.channels_last)
    if use_cl:
        teacher.net.to(memory_format=torch.channels_last)
    check_output_classes(student, splits, "student", dev)
    measured = dict(trigger=teacher.trigger, target=teacher.target, device=dev,
                    workers=data.workers)
    teacher_metrics = evaluate_model(teacher.net, splits.test, splits.mean, splits.std,
                                     **measured)
    run.save_job()
    history: list[dict] = []

    def meta(extra: dict) -> dict:
        return run_meta(student, splits, data.data_root, r.seed, role="student",
                        image_size_arg=data.image_size, factory=job.student_factory,
                        distillation={"method": job.method, "options": job.options or {},
                                      "teacher": str(job.teacher or job.teacher_factory),
                                      "clean_images": len(clean), "defense": job.defense},
                        **extra)

    def new_student() -> nn.Module:
        net = build_student(job, splits).to(dev)
        return net.to(memory_format=torch.channels_last) if use_cl else net

    o = job.optim
    loop = LoopSettings(mean=splits.mean, std=splits.std, augment=splits.augment,
                        batch_size=o.batch_size, device=dev, seed=r.seed, amp=r.amp,
                        channels_last=use_cl, progress=r.progress, workers=data.workers,
                        compile=r.compile)
    dist_run = DistillRun(
        epochs=o.epochs, eval_every=o.eval_every, trigger=teacher.trigger, target=teacher.target,
        optim=OptimConfig(name=o.optimizer, lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, schedule=o.schedule),
        state_dir=run.out / STATE_DIR, resume=r.resume,
        on_epoch_end=run.epoch_logger(student, meta, None, history))
    ctx = TransformContext(teacher.net, student, clean, splits.test, loop, dist_run,
                           job.flat(), run.out, new_student)
    extras: dict[str, Any] = {}
    ctx, _ = _transform(ctx, "defense", extras)  # a cleaned copy, when a defence is chosen
    log(f"distill ({job.method}) {job.teacher or job.teacher_factory} -> "
        f"{job.student or job.student_factory} on {len(clean)} clean images of {splits.name}, "
        f"{o.epochs} epochs; teacher {teacher_metrics}")
    ctx, distilled = _transform(ctx, "method", extras)
    if not distilled:
        extras.update(_distil(ctx, job, history))
    metrics = evaluate_model(student, splits.test, splits.mean, splits.std, **measured)
    save_run_model(run.out, student, meta({"metrics": metrics, "complete": True}))
    return run.finish(metrics, teacher_metrics=teacher_metrics, history=history,
                      throughput=throughput(history), clean_images=len(clean), **extras)


def _transform(ctx: TransformContext, chooser: str,
               extras: dict[str, Any]) -> tuple[TransformContext, bool]:
    """Run the teacher transform the setting ``chooser`` names, if any; its record fields
    join ``extras``. True when it distilled the student itself."""
    transform = chosen_transform(chooser, ctx.settings)
    if transform is None:
        return ctx, False
    done = transform(ctx)
    if done.message:
        log(done.message)
    extras.update(done.extras)
    return with_teacher(ctx, done.teacher), transform.distils_with is not None


def _distil(ctx: TransformContext, job: DistillJob, history: list[dict]) -> dict[str, Any]:
    """Plain distillation with the job's method; returns its record fields."""
    started = time.perf_counter()
    done, _ = distill_student(ctx.teacher, ctx.student, ctx.clean, ctx.test, loop=ctx.loop,
                              run=ctx.run, method=job.method, teacher_layers=job.teacher_layers,
                              student_layers=job.student_layers, options=job.options)
    history[:] = [h.as_dict() for h in done]  # includes epochs restored by --resume
    return {"distill_seconds": time.perf_counter() - started}
