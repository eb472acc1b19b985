"""``robustkd evaluate``: ACC, ASR under a known trigger, and optionally feature variance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustkd.api.context import RunContext, job_config, log
from robustkd.api.data import IN_MEMORY_HINT, not_streamable, prepare_streamed, streaming
from robustkd.api.models import check_model_fits
from robustkd.data import load_dataset
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model, feature_variance
from robustkd.io import read_json
from robustkd.jobs import EvaluateJob, from_job
from robustkd.runs import LoadedRun, is_unfinished, load_run
from robustkd.utils import resolve_device, seed_everything


@from_job(EvaluateJob)
def evaluate(job: EvaluateJob) -> dict[str, Any]:
    """ACC (and ASR under the run's own trigger, or another run's via ``trigger_from``).

    A run trained on streamed data is evaluated on its streamed evaluation split, with the
    same crop (``workers`` decode it)."""
    return run_evaluate(job)


def run_evaluate(job: EvaluateJob) -> dict[str, Any]:
    """:func:`evaluate` for a job already built."""
    out = Path(job.out) if job.out else Path(job.run) / "evaluation"
    run = RunContext("evaluate", job_config(job), out, job.seed)
    seed_everything(job.seed)
    run.device = resolve_device(job.device)
    model = load_run(job.run, run.device)
    ds_meta = model.meta["dataset"]
    name = job.dataset or ds_meta["name"]
    data_root = job.data_root or ds_meta.get("data_root")
    if streaming(name, False, model.meta):
        if job.feature_samples > 0:
            raise not_streamable("--feature-samples", f"feature variance reads an in-memory "
                                                      f"test subset; {IN_MEMORY_HINT}")
        splits, _ = prepare_streamed(name, data_root, ds_meta.get("resize"), None, job.seed)
    else:
        run.config.pop("workers")  # in-memory records keep their former config
        splits = load_dataset(name, data_root, image_size=ds_meta.get("resize"))
    check_model_fits(model.model, splits, "model")
    trigger, target, trigger_from = measured_trigger(model, run.device, job.trigger_from)
    extra: dict[str, Any] = {"trigger_from": str(trigger_from) if trigger_from else None}
    if is_unfinished(model.meta):
        log(f"warning: {job.run} is an unfinished run ({model.meta['epochs_done']} "
            "epochs done); these are the numbers of that checkpoint")
        extra["unfinished"] = True
    metrics = evaluate_model(model.model, splits.test, model.mean, model.std, trigger=trigger,
                             target=target, device=run.device, batch_size=job.batch_size,
                             workers=job.workers)
    if job.feature_samples > 0:
        layers = [layer.stage for layer in model.model.distill_layers()]
        gen = torch.Generator().manual_seed(job.seed)
        pick = torch.randperm(len(splits.test), generator=gen)[:job.feature_samples]
        var = feature_variance(model.model, layers, splits.test.subset(pick), model.mean,
                               model.std, device=run.device)
        extra["feature_variance"] = {
            k: {"mean": float(v.mean()), "values": v.tolist()} for k, v in var.items()
        }
        metrics.update({f"var_{k}": float(v.mean()) for k, v in var.items()})
    return run.record(metrics, model_dir=str(job.run), **extra)


def measured_trigger(model: LoadedRun, device: torch.device | str,
                     trigger_from: str | None = None) -> tuple[Any, int | None, str | None]:
    """The trigger ASR is measured with: ``trigger_from``'s, else the run's own, else (a
    student) its teacher's, if any; with the run it was read from."""
    trigger, target = model.trigger, model.target
    if trigger_from is None and trigger is None:
        trigger_from = _distilled_from(model.meta)
    if trigger_from is not None:
        other = load_run(trigger_from, device)
        if other.trigger is None:
            raise ConfigError(f"{trigger_from} carries no trigger")
        trigger, target = other.trigger, other.target
    return trigger, target, trigger_from


def _distilled_from(meta: dict[str, Any]) -> str | None:
    """The teacher run a student was distilled from, when that run carries a trigger."""
    teacher = (meta.get("distillation") or {}).get("teacher")
    if not teacher or not (Path(teacher) / "meta.json").exists():
        return None
    try:
        return teacher if read_json(Path(teacher) / "meta.json").get("trigger") else None
    except (OSError, ValueError):
        return None
