"""``robustkd import``: an external weights file (e.g. from a model hub) as a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.api.context import RunContext, job_config
from robustkd.api.models import load_weights_into
from robustkd.data import load_dataset
from robustkd.evaluation.metrics import evaluate_model
from robustkd.jobs import ImportJob, from_job
from robustkd.models import build_model
from robustkd.runs import run_meta, save_run_model
from robustkd.utils import resolve_device


@from_job(ImportJob)
def import_weights(job: ImportJob) -> dict[str, Any]:
    """Turn an external weights file (e.g. from a model hub) into a run directory.

    safetensors files load as they are; pickle files only with ``allow_pickle`` (and then with
    ``weights_only=True``). The result is evaluated so the record shows what was imported.
    """
    return run_import(job)


def run_import(job: ImportJob) -> dict[str, Any]:
    """:func:`import_weights` for a job already built."""
    run = RunContext("import", job_config(job), Path(job.out), job.seed)
    run.open(overwrite=job.overwrite)
    run.device = resolve_device(job.device)
    splits = load_dataset(job.dataset, job.data_root, image_size=job.image_size)
    net = build_model(job.model, num_classes=splits.num_classes,
                      in_channels=splits.train.channels)
    load_weights_into(net, job.weights, job.allow_pickle,
                      f"{job.model} for {splits.num_classes} classes")
    net.to(run.device)
    metrics = evaluate_model(net, splits.test, splits.mean, splits.std, device=run.device)
    save_run_model(run.out, net, run_meta(net, splits, job.data_root, job.seed, role="imported",
                                          image_size_arg=job.image_size,
                                          source=str(job.weights), metrics=metrics,
                                          complete=True))
    return run.record(metrics)
