"""``robustkd train``: a clean classifier (a teacher or a student baseline) from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from robustkd.api.context import MetaFn, RunContext, job_config, log, throughput
from robustkd.api.data import prepare_data, prepare_streamed, streaming
from robustkd.api.models import prepare_model
from robustkd.data.dataset import DatasetSplits
from robustkd.evaluation.metrics import evaluate_model
from robustkd.jobs import OptimSpec, RuntimeSpec, TrainJob, from_job
from robustkd.models import build_model
from robustkd.outputs import STATE_DIR
from robustkd.runs import run_meta, save_run_model
from robustkd.training.classifier import train_classifier
from robustkd.training.loop import EpochResult
from robustkd.training.optim import OptimConfig
from robustkd.triggers import Trigger
from robustkd.utils import describe_device, resolve_device, seed_everything


@from_job(TrainJob)
def train(job: TrainJob) -> dict[str, Any]:
    """Train a clean classifier (a teacher or a student baseline) from scratch.

    ``holdout`` evaluates on a validation split carved from the training data instead of
    the test set (later attack/distill runs from this run inherit it). ``stream`` (always on
    for ``imagenet``) decodes ``DATA_ROOT/NAME/{train,val}`` from disk batch by batch in
    ``workers`` processes instead of loading it into memory; ``image_size`` is then the crop
    size (default 224)."""
    return run_train(job)


def run_train(job: TrainJob) -> dict[str, Any]:
    """:func:`train` for a job already built."""
    d, o, r = job.data, job.optim, job.runtime
    run = RunContext("train", job_config(job), Path(job.out), r.seed)
    run.open(resume=r.resume, overwrite=r.overwrite)
    seed_everything(r.seed)
    run.device = resolve_device(r.device)
    streamed = streaming(d.dataset, d.stream)
    if streamed:
        run.config["stream"] = True
        splits, train_ds = prepare_streamed(d.dataset, d.data_root, d.image_size,
                                            d.train_fraction, r.seed, d.holdout)
    else:
        for key in ("stream", "workers"):  # in-memory records keep their former config
            run.config.pop(key)
        splits, train_ds = prepare_data(d.dataset, d.data_root, d.image_size,
                                        d.train_fraction, r.seed, d.download, d.holdout)
    net = build_model(job.model, num_classes=splits.num_classes,
                      in_channels=splits.train.channels, **(job.model_kwargs or {}))
    use_cl = prepare_model(net, run.device, r.channels_last)
    history: list[dict] = []

    def meta(extra: dict) -> dict:
        return run_meta(net, splits, d.data_root, r.seed, role="clean",
                        image_size_arg=d.image_size, train_images=len(train_ds),
                        train_fraction=d.train_fraction, **extra)

    log(f"train {job.model} on {splits.name}: {len(train_ds)} train / {len(splits.test)} test "
        f"images{' (streamed from disk)' if streamed else ''}, {o.epochs} epochs, "
        f"device {describe_device(run.device)}")
    run.save_job()
    done = train_run(run, net, train_ds, splits, o, r, meta, history, channels_last=use_cl,
                     desc=f"train {job.model}", workers=d.workers)
    history[:] = [h.as_dict() for h in done]  # includes epochs restored by --resume
    metrics = evaluate_model(net, splits.test, splits.mean, splits.std, device=run.device,
                             workers=d.workers)
    save_run_model(run.out, net, meta({"metrics": metrics, "complete": True}))
    return run.finish(metrics, history=history, throughput=throughput(history))


def train_run(run: RunContext, net: nn.Module, data: Any, splits: DatasetSplits,
              optim: OptimSpec, runtime: RuntimeSpec, meta: MetaFn, history: list[dict], *,
              channels_last: bool, trigger: Trigger | None = None, target: int | None = None,
              **kw: Any) -> list[EpochResult]:
    """Cross-entropy training of a run's model (train and attack) with a checkpoint and a
    log line per epoch."""
    return train_classifier(
        net, data, splits.test, mean=splits.mean, std=splits.std, augment=splits.augment,
        optim=OptimConfig(name=optim.optimizer, lr=optim.lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay, schedule=optim.schedule),
        trigger=trigger, target=target, state_dir=run.out / STATE_DIR,
        on_epoch_end=run.epoch_logger(net, meta, trigger, history), epochs=optim.epochs,
        batch_size=optim.batch_size, device=run.device, seed=runtime.seed,
        resume=runtime.resume, amp=runtime.amp, channels_last=channels_last,
        compile=runtime.compile, progress=runtime.progress, eval_every=optim.eval_every, **kw)
