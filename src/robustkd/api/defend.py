"""``robustkd defend``: clean a finished model with a registered defence, as a new run.

A user who already distilled a student (or downloaded a teacher) can clean it without
training again; the benchmark uses it to prune its FKD students (the last step of the
``student-prune`` preset) without distilling them twice. The cleaned model is written with
the parent's meta (architecture, normalisation, data, trigger or teacher), so every other
command reads it like the parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.api.context import RunContext, job_config, log
from robustkd.api.data import run_data
from robustkd.api.evaluate import measured_trigger
from robustkd.api.models import prepare_model
from robustkd.defenses.registry import DefenseContext, defend_teacher, get_teacher_defense
from robustkd.defenses.registry import make_settings as defense_settings
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.io import RECORD_FILE, read_json
from robustkd.jobs import DefendJob, from_job
from robustkd.runs import load_teacher, save_run_model
from robustkd.utils import resolve_device, seed_everything

DEFENSE_DIR = "defense"  # the defence's own report and weights (resume reuses them)


@from_job(DefendJob)
def defend(job: DefendJob) -> dict[str, Any]:
    """Run defence ``defense`` (settings ``options``) on a copy of the model of ``run``, on
    the defender's clean subset (``clean_fraction`` per class, chosen by ``clean_seed``);
    write the cleaned model to ``out`` and return its record (test ACC, and ASR under the
    run's trigger or its teacher's, before and after)."""
    return run_defend(job)


def run_defend(job: DefendJob) -> dict[str, Any]:
    """:func:`defend` for a job already built."""
    r = job.runtime
    spec = get_teacher_defense(job.defense)
    defense_settings(spec, job.options)  # checked where it enters
    if not spec.standalone:
        raise ConfigError(f"--defense {job.defense} makes a teacher tied to the defender's "
                          f"images that only distillation can read: use robustkd distill "
                          f"--defense {job.defense}")
    run = RunContext("defend", job_config(job), Path(job.out), r.seed)
    run.open(resume=r.resume, overwrite=r.overwrite, inputs={"--run": job.run})
    seed_everything(r.seed)
    run.device = dev = resolve_device(r.device)
    parent = load_teacher(job.run, dev, "--run")
    use_cl = prepare_model(parent.model, dev, r.channels_last)
    subset_seed = r.seed if job.clean_seed is None else job.clean_seed
    splits, clean = run_data(parent.meta, job.data_root, job.clean_fraction, subset_seed)
    trigger, target, trigger_from = measured_trigger(parent, dev)
    ctx = DefenseContext(clean=clean, mean=parent.mean, std=parent.std,
                         augment=splits.augment, device=dev, seed=r.seed, test=splits.test,
                         trigger=trigger, target=target, amp=r.amp,
                         channels_last=use_cl, progress=r.progress)
    before = evaluate_model(parent.model, splits.test, parent.mean, parent.std,
                            trigger=trigger, target=target, device=dev)
    run.save_job()
    cleaned, report = defend_teacher(job.defense, parent.model, ctx, job.options,
                                     run_dir=run.out / DEFENSE_DIR, resume=r.resume)
    metrics = report.pop("cleaned_teacher_metrics")
    log(f"defend ({job.defense}) {job.run} on {len(clean)} clean images: {before} -> "
        f"{metrics}")
    save_run_model(run.out, cleaned, {**parent.meta, "metrics": metrics, "defended": {
        "run": str(job.run), "defense": job.defense, "clean_images": len(clean)}},
        parent.trigger)
    parent_record = Path(job.run) / RECORD_FILE
    parent_seconds = read_json(parent_record).get("seconds") if parent_record.exists() else None
    return run.finish(metrics, defense=report, parent_metrics=before,
                      parent_seconds=parent_seconds, clean_images=len(clean),
                      trigger_from=str(trigger_from) if trigger_from else None)
