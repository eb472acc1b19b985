"""``robustkd scan``: per-layer feature-variance statistics on clean test images (paper
Fig. 2), against a reference model when one is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustkd.api.context import RunContext, job_config, log
from robustkd.data import load_dataset
from robustkd.evaluation.metrics import feature_variance
from robustkd.evaluation.scan import plot_histograms, summarise
from robustkd.jobs import ScanJob, from_job
from robustkd.runs import load_run
from robustkd.utils import resolve_device


@from_job(ScanJob)
def scan(job: ScanJob) -> dict[str, Any]:
    """Per-layer feature-variance statistics on clean test images (paper Fig. 2), with a
    comparison against a reference model and a histogram PNG when matplotlib is present."""
    return run_scan(job)


def run_scan(job: ScanJob) -> dict[str, Any]:
    """:func:`scan` for a job already built."""
    out = Path(job.out) if job.out else Path(job.run) / "scan"
    run = RunContext("scan", job_config(job), out, job.seed)
    run.device = dev = resolve_device(job.device)
    model = load_run(job.run, dev)
    ds_meta = model.meta["dataset"]
    splits = load_dataset(job.dataset or ds_meta["name"], job.data_root or ds_meta.get("data_root"),
                          image_size=ds_meta.get("resize"))
    pick = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(job.seed))
    images = splits.test.subset(pick[:job.feature_samples])
    layers = [layer.stage for layer in model.model.distill_layers()]
    values = feature_variance(model.model, layers, images, model.mean, model.std, device=dev)
    ref_values = ref_layers = None
    if job.reference is not None:
        ref = load_run(job.reference, dev)
        ref_layers = [layer.stage for layer in ref.model.distill_layers()]
        ref_values = feature_variance(ref.model, ref_layers, images, ref.mean, ref.std,
                                      device=dev)
    stats, lines = summarise(layers, values, ref_values, ref_layers)
    png = plot_histograms(out / "variance.png", layers, values, ref_values,
                          (str(job.run), str(job.reference)), ref_layers)
    for line in lines:
        log(line)
    metrics = {f"var_{k}": v["model"]["mean"] for k, v in stats.items()}
    metrics.update({f"ratio_{k}": v["ratio"] for k, v in stats.items() if "ratio" in v})
    return run.record(metrics, layers=stats, summary=lines, figure=str(png) if png else None,
                      values={k: v.tolist() for k, v in values.items()})
