"""``robustkd attack``: implant a backdoor by poison fine-tuning a clean teacher run, or by
training poisoned from scratch."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from robustkd.api.attack_inputs import attack_models, attack_source
from robustkd.api.context import RunContext, job_config, log, throughput
from robustkd.api.data import IN_MEMORY_HINT, not_streamable, prepare_data, streaming
from robustkd.api.models import prepare_model
from robustkd.api.train import train_run
from robustkd.attacks import AttackContext, get_attack
from robustkd.attacks.render import render_trigger
from robustkd.data.dataset import ImageDataset
from robustkd.evaluation.metrics import evaluate_model
from robustkd.jobs import AttackJob, from_job
from robustkd.runs import run_meta, save_run_model
from robustkd.triggers import Trigger
from robustkd.utils import resolve_device, seed_everything


@from_job(AttackJob)
def attack(job: AttackJob) -> dict[str, Any]:
    """Implant a backdoor: poison-fine-tune a clean teacher run, or train poisoned from scratch.

    Fine-tuning defaults follow the CKD authors (8 epochs, SGD lr 0.008, constant);
    from scratch it uses the clean-training defaults (30 epochs, lr 0.1, step schedule).
    From scratch, ``trigger_teacher`` (a clean run of the same data) is the model a learned
    trigger (CKD, LBA) is optimised on, and the one whose ASR under the trigger is recorded
    as the backdoor-free level; the poisoned model itself starts from random weights.
    """
    return run_attack(job)


def run_attack(job: AttackJob) -> dict[str, Any]:
    """:func:`attack` for a job already built."""
    r = job.runtime
    config = job_config(job)
    if job.trigger_teacher is None:
        config.pop("trigger_teacher")  # records without it keep their former config
    run = RunContext("attack", config, Path(job.out), r.seed)
    seed_everything(r.seed)
    run.device = resolve_device(r.device)
    spec = get_attack(job.attack)
    settings = spec.make_settings(job.options)  # checked before any data or model is loaded
    run.open(resume=r.resume, overwrite=r.overwrite,
             inputs={"--teacher": job.teacher, "--trigger-teacher": job.trigger_teacher})
    parent, data, optim = attack_source(job, run)
    run.config.update(epochs=optim.epochs, lr=optim.lr, schedule=optim.schedule)
    if streaming(data.dataset, False, parent.meta if parent else None):
        raise not_streamable(f"attack {job.attack}", f"poisoning builds the poisoned "
                             f"training set in memory; {IN_MEMORY_HINT}")
    splits, train_ds = prepare_data(data.dataset, data.data_root, data.image_size,
                                    data.train_fraction, r.seed, data.download, data.holdout)
    net, reference = attack_models(job, run, parent, splits)
    use_cl = prepare_model(net, run.device, r.channels_last)
    ctx = AttackContext(splits, reference, settings, run.device, target=job.target,
                        progress=r.progress)
    trigger, poisoned, extras = _poison(job, run, spec, ctx, train_ds)
    extra_loss = spec.extra_loss(ctx, net, poisoned) if spec.extra_loss else None
    trainable = spec.trainable(ctx, net) if spec.trainable else None
    log(f"attack {job.attack}: {int(poisoned.is_poison.sum())} poisoned of {len(poisoned)} "
        f"training images, target {job.target} ({splits.classes[job.target]}), "
        f"{optim.epochs} epochs")
    history: list[dict] = []
    attack_meta = {"name": job.attack, "poison_ratio": job.poison_ratio, "options":
                   job.options or {}, "keep_originals": job.keep_originals,
                   "mode": "finetune" if parent else "scratch"}

    def meta(extra: dict) -> dict:
        return run_meta(net, splits, data.data_root, r.seed, trigger=trigger, target=job.target,
                        role="backdoored", image_size_arg=data.image_size, attack=attack_meta,
                        train_images=len(train_ds), train_fraction=data.train_fraction,
                        parent=str(job.teacher) if job.teacher else None, **extra)

    hooks = spec.training_hooks(ctx, net) if spec.training_hooks else nullcontext()
    with hooks:
        done = train_run(run, net, poisoned, splits, optim, r, meta, history,
                         channels_last=use_cl, trigger=trigger, target=job.target,
                         desc=f"attack {job.attack}", extra_loss=extra_loss,
                         trainable=trainable)
    history[:] = [h.as_dict() for h in done]
    metrics = evaluate_model(net, splits.test, splits.mean, splits.std, trigger=trigger,
                             target=job.target, device=run.device)
    save_run_model(run.out, net, meta({"metrics": metrics, "complete": True}), trigger)
    return run.finish(metrics, **extras, history=history, throughput=throughput(history),
                      poisoned_images=int(poisoned.is_poison.sum()), trigger=trigger.config())


def _poison(job: AttackJob, run: RunContext, spec: Any, ctx: AttackContext,
            train_ds: ImageDataset) -> tuple[Trigger, ImageDataset, dict[str, Any]]:
    """The trigger (rendered into the run), the poisoned training set, and the record's
    timings and ``teacher_metrics``: the clean model under the trigger (the ASR a
    backdoor-free model already shows)."""
    splits, dev = ctx.splits, run.device
    started = time.perf_counter()
    trigger = spec.build_trigger(ctx).to(dev)
    trigger_seconds = time.perf_counter() - started
    before = evaluate_model(ctx.model, splits.test, splits.mean, splits.std, trigger=trigger,
                            target=job.target, device=dev) if ctx.model is not None else None
    run.save_job()
    pick = torch.linspace(0, len(splits.test) - 1, 6).long()
    render_trigger(trigger, splits.test.images[pick], run.out)
    started = time.perf_counter()
    poisoned = spec.build_poison(ctx, trigger.cpu(), train_ds, target=job.target,
                                 ratio=job.poison_ratio, keep_originals=job.keep_originals,
                                 seed=job.runtime.seed)
    extras = {"teacher_metrics": before, "trigger_seconds": trigger_seconds,
              "poison_seconds": time.perf_counter() - started}
    trigger.to(dev)
    return trigger, poisoned, extras
