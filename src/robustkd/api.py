"""The Python API behind every CLI command: train, attack, evaluate.

Each function reads data, builds or loads models, runs the one training loop, writes a
run directory (checkpoint per epoch, ``meta.json``, ``record.json``) and returns the
record as a dict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from robustkd import distributed as ddp
from robustkd.attacks import AttackContext, get_attack
from robustkd.attacks.render import render_trigger
from robustkd.data import load_dataset, per_class_subset
from robustkd.data.dataset import DatasetSplits
from robustkd.data.registry import STREAMED
from robustkd.data.streaming import StreamedImageFolder, StreamedSplits, load_streamed
from robustkd.defenses import DefenseContext, defend_teacher
from robustkd.defenses.detox import DetoxMasks
from robustkd.defenses.inversion import SyntheticTriggers
from robustkd.defenses.robustkd import robustkd_config, run_robustkd
from robustkd.distill import distill_student
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model, feature_variance
from robustkd.evaluation.scan import plot_histograms, summarise
from robustkd.hub import local_weights
from robustkd.io import RECORD_FILE, load_state_dict, read_json, save_tensors, write_json
from robustkd.jobs import (
    AttackJob,
    DistillJob,
    EvaluateJob,
    ImportJob,
    ScanJob,
    TrainJob,
    from_job,
)
from robustkd.models import build_model
from robustkd.models.taps import tap
from robustkd.outputs import STATE_DIR, earlier_seconds, finish_run, prepare_out, write_job
from robustkd.runs import (
    is_unfinished,
    load_run,
    load_teacher,
    run_meta,
    save_run_model,
    write_record,
)
from robustkd.training.classifier import train_classifier
from robustkd.training.loop import EpochResult
from robustkd.training.optim import OptimConfig
from robustkd.utils import describe_device, resolve_device, seed_everything

STREAMED_METHODS = ("fkd", "kd", "ce")  # distillation that only reads (x, y) batches
DETOX_FILE = "detox.safetensors"
DETOX_META = "detox.json"


def _log(message: str) -> None:
    if ddp.is_main():  # under torchrun every rank runs the command; one log is enough
        tqdm.write(message)


def _prepare_data(
    dataset: str,
    data_root: str | None,
    image_size: int | None,
    train_fraction: float | None,
    seed: int,
    download: bool = False,
    holdout: float | None = None,
) -> tuple[DatasetSplits, Any]:
    splits = load_dataset(
        dataset, data_root, image_size=image_size, download=download, holdout=holdout
    )
    train = splits.train
    if train_fraction is not None and train_fraction < 1.0:
        train = per_class_subset(train, fraction=train_fraction, seed=seed)
    return splits, train


def _streaming(dataset: str | None, stream: bool, parent_meta: dict | None = None) -> bool:
    """Whether a run streams its data from disk: asked for, the dataset is too big for memory
    (``imagenet``), or the run it continues from streamed (so a teacher's data pipeline,
    crop and normalisation carry over to its students)."""
    if stream or (parent_meta is not None and parent_meta["dataset"].get("streamed")):
        return True
    return dataset is not None and str(dataset).strip().lower() in STREAMED


def _prepare_streamed(
    dataset: str,
    data_root: str | None,
    image_size: int | None,
    fraction: float | None,
    seed: int,
    holdout: float | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> tuple[StreamedSplits, StreamedImageFolder]:
    """The streamed counterpart of :func:`_prepare_data`: only file lists are read.

    ``image_size`` is the crop size (default 224); ``fraction`` keeps a per-class share of
    the training files by the same rule (and seed) as the in-memory ``per_class_subset``.
    ``normalization`` (a teacher run's ``mean``/``std``) replaces the ImageNet statistics, so
    a teacher trained on in-memory data sees inputs normalised as in its own training.
    """
    if holdout:
        raise _not_streamable(
            "--holdout", "a validation split is carved from in-memory training data; evaluate "
            "on the streamed val/ split instead (omit --holdout)")
    if data_root is None:
        raise ConfigError(
            f"streamed dataset {dataset!r} needs --data-root DIR holding {dataset}/train/<class>/ "
            f"and {dataset}/val/<class>/ (or test/), or {dataset}.tar.gz")
    stats = {} if normalization is None else {k: normalization[k] for k in ("mean", "std")}
    splits = load_streamed(dataset, data_root, crop_size=image_size or 224, **stats)
    train = splits.train
    if fraction is not None and fraction < 1.0:
        train = per_class_subset(train, fraction=fraction, seed=seed)
    return splits, train


def _not_streamable(what: str, hint: str) -> ConfigError:
    """One wording for everything that needs the data in memory, so users learn the rule."""
    return ConfigError(
        f"{what} is not supported with streamed data (--stream, or dataset imagenet): {hint}")


_IN_MEMORY_HINT = (
    "run it on in-memory data instead: tinyimagenet200 (the ImageNet stand-in), or an "
    "ImageFolder copy NAME/{train,test}/<class>/ of a subset of ImageNet's classes/images, "
    "loaded without --stream at a small --image-size (e.g. 64)")


def _check_streamed_distill(method: str, defense: str | None) -> None:
    """Streamed distillation covers the baselines that only read ``(x, y)`` batches; RobustKD
    (detox masks, trigger synthesis) and teacher defences keep the clean subset in memory."""
    if method not in STREAMED_METHODS:
        raise _not_streamable(
            f"--method {method}",
            f"its detoxification and trigger synthesis work on an in-memory clean subset; "
            f"streamed distillation supports --method {', '.join(STREAMED_METHODS)}; for "
            f"{method}, {_IN_MEMORY_HINT}")
    if defense is not None:
        raise _not_streamable(
            f"--defense {defense}",
            f"teacher defences clean the teacher on an in-memory clean subset; {_IN_MEMORY_HINT}")


def _check_model_fits(model: nn.Module, splits: DatasetSplits, what: str) -> None:
    kwargs = getattr(model, "arch_kwargs", None) or {}
    n = kwargs.get("num_classes")
    if n is not None and n != splits.num_classes:
        raise ConfigError(
            f"{what} has {n} output classes but dataset {splits.name} has "
            f"{splits.num_classes}; pick the dataset the {what} was trained on"
        )
    c = kwargs.get("in_channels")
    if c is not None and c != splits.train.channels:
        raise ConfigError(
            f"{what} expects {c}-channel images but dataset {splits.name} has "
            f"{splits.train.channels} channels"
        )


def _epoch_logger(run_dir: Path, model: nn.Module, meta_fn, trigger, history_out: list,
                  started: float):
    """Print a line per epoch and write a checkpoint per epoch (atomically); the meta keeps
    the wall time so far (``started``: perf_counter at the start, earlier runs included)."""

    def on_epoch_end(result: EpochResult) -> None:
        history_out.append(result.as_dict())
        parts = [f"epoch {result.epoch}", f"loss {result.loss:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in {**result.stats, **result.extra}.items()]
        parts.append(f"{result.images_per_second:.0f} img/s")
        _log("  ".join(parts))
        save_run_model(
            run_dir,
            model,
            meta_fn({"epochs_done": result.epoch, "last_epoch": result.as_dict(),
                     "elapsed_seconds": time.perf_counter() - started}),
            trigger,
        )

    return on_epoch_end


def _prepare_model(model: nn.Module, device: torch.device, channels_last: bool | None) -> bool:
    """Move to the device; channels_last by default (faster for convs on CUDA and, measured
    here, ~10-25% faster for WRN training on 2 CPU cores too)."""
    use_cl = True if channels_last is None else channels_last
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    return use_cl


def _train_run(
    net, train_ds, splits, optim, run_dir, meta, history, trigger, target, started, **kw
) -> list[EpochResult]:
    """Cross-entropy training of a run's model with a checkpoint and log line per epoch."""
    return train_classifier(
        net,
        train_ds,
        splits.test,
        mean=splits.mean,
        std=splits.std,
        augment=splits.augment,
        optim=optim,
        trigger=trigger,
        target=target,
        state_dir=run_dir / STATE_DIR,
        on_epoch_end=_epoch_logger(run_dir, net, meta, trigger, history, started),
        **kw,
    )


@from_job(TrainJob)
def train(
    *,
    dataset: str,
    data_root: str | None,
    model: str,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    schedule: str,
    weight_decay: float,
    momentum: float,
    seed: int,
    train_fraction: float | None,
    image_size: int | None,
    download: bool,
    device: str,
    out: str | Path,
    resume: bool,
    amp: bool,
    channels_last: bool | None,
    compile: bool,
    progress: bool,
    eval_every: int,
    model_kwargs: dict | None,
    holdout: float | None,
    stream: bool,
    workers: int | None,
    overwrite: bool,
) -> dict[str, Any]:
    """Train a clean classifier (a teacher or a student baseline) from scratch.

    ``holdout`` evaluates on a validation split carved from the training data instead of
    the test set (later attack/distill runs from this run inherit it). ``stream`` (always on
    for ``imagenet``) decodes ``DATA_ROOT/NAME/{train,val}`` from disk batch by batch in
    ``workers`` processes instead of loading it into memory; ``image_size`` is then the crop
    size (default 224)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    started = time.perf_counter()
    prepare_out(out, resume=resume, overwrite=overwrite, job=config)
    started -= earlier_seconds(out, resume)  # a resumed run reports its total time
    seed_everything(seed)
    dev = resolve_device(device)
    streamed = _streaming(dataset, stream)
    if streamed:
        config["stream"] = True
        splits, train_ds = _prepare_streamed(
            dataset, data_root, image_size, train_fraction, seed, holdout
        )
    else:
        for key in ("stream", "workers"):  # in-memory records keep their former config
            config.pop(key)
        splits, train_ds = _prepare_data(
            dataset, data_root, image_size, train_fraction, seed, download, holdout
        )
    net = build_model(
        model,
        num_classes=splits.num_classes,
        in_channels=splits.train.channels,
        **(model_kwargs or {}),
    )
    use_cl = _prepare_model(net, dev, channels_last)
    run_dir = Path(out)
    history: list[dict] = []

    def meta(extra: dict) -> dict:
        return run_meta(
            net,
            splits,
            data_root,
            seed,
            role="clean",
            image_size_arg=image_size,
            train_images=len(train_ds),
            train_fraction=train_fraction,
            **extra,
        )

    optim = OptimConfig(
        name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule
    )
    _log(
        f"train {model} on {splits.name}: {len(train_ds)} train / {len(splits.test)} test "
        f"images{' (streamed from disk)' if streamed else ''}, {epochs} epochs, "
        f"device {describe_device(dev)}"
    )
    write_job(run_dir, config)
    done = _train_run(
        net,
        train_ds,
        splits,
        optim,
        run_dir,
        meta,
        history,
        None,
        None,
        started,
        epochs=epochs,
        batch_size=batch_size,
        device=dev,
        seed=seed,
        resume=resume,
        amp=amp,
        channels_last=use_cl,
        compile=compile,
        progress=progress,
        eval_every=eval_every,
        desc=f"train {model}",
        workers=workers,
    )
    history[:] = [h.as_dict() for h in done]  # includes epochs restored by --resume
    metrics = evaluate_model(net, splits.test, splits.mean, splits.std, device=dev,
                             workers=workers)
    save_run_model(run_dir, net, meta({"metrics": metrics, "complete": True}))
    write_record(
        run_dir,
        command="train",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
        history=history,
        throughput=_throughput(history),
    )
    finish_run(run_dir)
    return _read(run_dir)


@from_job(AttackJob)
def attack(
    *,
    attack: str,
    teacher: str | Path | None,
    model: str | None,
    dataset: str | None,
    data_root: str | None,
    target: int,
    poison_ratio: float,
    keep_originals: bool,
    epochs: int | None,
    batch_size: int,
    lr: float | None,
    optimizer: str,
    schedule: str | None,
    weight_decay: float,
    momentum: float,
    seed: int,
    train_fraction: float | None,
    image_size: int | None,
    download: bool,
    device: str,
    out: str | Path,
    resume: bool,
    amp: bool,
    channels_last: bool | None,
    compile: bool,
    progress: bool,
    eval_every: int,
    options: dict[str, Any] | None,
    holdout: float | None,
    trigger_teacher: str | Path | None,
    overwrite: bool,
    allow_partial: bool,
) -> dict[str, Any]:
    """Implant a backdoor: poison-fine-tune a clean teacher run, or train poisoned from scratch.

    Fine-tuning defaults follow the CKD authors (8 epochs, SGD lr 0.008, constant);
    from scratch it uses the clean-training defaults (30 epochs, lr 0.1, step schedule).
    From scratch, ``trigger_teacher`` (a clean run of the same data) is the model a learned
    trigger (CKD, LBA) is optimised on, and the one whose ASR under the trigger is recorded
    as the backdoor-free level; the poisoned model itself starts from random weights.
    """
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    if trigger_teacher is None:
        config.pop("trigger_teacher")  # records without it keep their former config
    started = time.perf_counter()
    seed_everything(seed)
    dev = resolve_device(device)
    spec = get_attack(attack)
    settings = spec.make_settings(options)  # checked before any data or model is loaded
    prepare_out(out, resume=resume, overwrite=overwrite, job=config,
                inputs={"--teacher": teacher, "--trigger-teacher": trigger_teacher})
    started -= earlier_seconds(out, resume)
    if (teacher is None) == (model is None):
        raise ConfigError(
            "give either --teacher RUN_DIR (poison fine-tuning of a clean model) "
            "or --model NAME (poisoning from scratch), not both or neither"
        )
    parent = None
    if trigger_teacher is not None and teacher is not None:
        raise ConfigError("--trigger-teacher is for poisoning from scratch (--model); with "
                          "--teacher the trigger is learned on that teacher")
    if teacher is not None:
        parent = load_teacher(teacher, dev, "--teacher", allow_partial)
        net = parent.model
        dataset = dataset or parent.meta["dataset"]["name"]
        data_root = data_root or parent.meta["dataset"].get("data_root")
        image_size = image_size or parent.meta["dataset"].get("resize")
        if train_fraction is None:  # poison the data the teacher was trained on
            train_fraction = parent.meta.get("train_fraction")
        holdout = holdout or parent.meta["dataset"].get("holdout")
        epochs, lr = epochs or 8, lr or 0.008
        schedule = schedule or "constant"
    else:
        if dataset is None:
            raise ConfigError("--dataset is required when poisoning from scratch")
        epochs, lr, schedule = epochs or 30, lr or 0.1, schedule or "step"
    config.update(epochs=epochs, lr=lr, schedule=schedule)  # the record shows what ran
    if _streaming(dataset, False, parent.meta if parent else None):
        raise _not_streamable(
            f"attack {attack}",
            f"poisoning builds the poisoned training set in memory; {_IN_MEMORY_HINT}")
    splits, train_ds = _prepare_data(
        dataset, data_root, image_size, train_fraction, seed, download, holdout
    )
    if parent is None:
        net = build_model(
            model, num_classes=splits.num_classes, in_channels=splits.train.channels
        ).to(dev)
    _check_model_fits(net, splits, "teacher" if parent else "model")
    reference = parent.model if parent else None
    if trigger_teacher is not None:
        reference = load_teacher(trigger_teacher, dev, "--trigger-teacher",
                                 allow_partial).model
        _check_model_fits(reference, splits, "--trigger-teacher")
    if not 0 <= target < splits.num_classes:
        raise ConfigError(
            f"--target {target} is not a class of {splits.name} (0..{splits.num_classes - 1})"
        )
    use_cl = _prepare_model(net, dev, channels_last)
    trigger_started = time.perf_counter()
    ctx = AttackContext(splits, reference, settings, dev, target=target, progress=progress)
    trigger = spec.build_trigger(ctx).to(dev)
    trigger_seconds = time.perf_counter() - trigger_started
    # the clean model under the new trigger: the ASR a backdoor-free model already shows
    before = (
        evaluate_model(
            reference, splits.test, splits.mean, splits.std, trigger=trigger, target=target,
            device=dev,
        )
        if reference is not None
        else None
    )
    run_dir = Path(out)
    write_job(run_dir, config)
    pick = torch.linspace(0, len(splits.test) - 1, 6).long()
    render_trigger(trigger, splits.test.images[pick], run_dir)
    poison_started = time.perf_counter()
    poisoned = spec.build_poison(
        ctx,
        trigger.cpu(),
        train_ds,
        target=target,
        ratio=poison_ratio,
        keep_originals=keep_originals,
        seed=seed,
    )
    poison_seconds = time.perf_counter() - poison_started
    trigger.to(dev)
    extra_loss = spec.extra_loss(ctx, net, poisoned) if spec.extra_loss else None
    trainable = spec.trainable(ctx, net) if spec.trainable else None
    _log(
        f"attack {attack}: {int(poisoned.is_poison.sum())} poisoned of {len(poisoned)} "
        f"training images, target {target} ({splits.classes[target]}), {epochs} epochs"
    )
    history: list[dict] = []

    def meta(extra: dict) -> dict:
        return run_meta(
            net,
            splits,
            data_root,
            seed,
            trigger=trigger,
            target=target,
            role="backdoored",
            image_size_arg=image_size,
            train_images=len(train_ds),
            train_fraction=train_fraction,
            attack={
                "name": attack,
                "poison_ratio": poison_ratio,
                "keep_originals": keep_originals,
                "mode": "finetune" if parent else "scratch",
                "options": options or {},
            },
            parent=str(teacher) if teacher else None,
            **extra,
        )

    optim = OptimConfig(
        name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule
    )
    done = _train_run(
        net,
        poisoned,
        splits,
        optim,
        run_dir,
        meta,
        history,
        trigger,
        target,
        started,
        epochs=epochs,
        batch_size=batch_size,
        device=dev,
        seed=seed,
        resume=resume,
        amp=amp,
        channels_last=use_cl,
        compile=compile,
        progress=progress,
        eval_every=eval_every,
        desc=f"attack {attack}",
        extra_loss=extra_loss,
        trainable=trainable,
    )
    history[:] = [h.as_dict() for h in done]
    metrics = evaluate_model(
        net, splits.test, splits.mean, splits.std, trigger=trigger, target=target, device=dev
    )
    save_run_model(run_dir, net, meta({"metrics": metrics, "complete": True}), trigger)
    write_record(
        run_dir,
        command="attack",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
        teacher_metrics=before,
        history=history,
        throughput=_throughput(history),
        poisoned_images=int(poisoned.is_poison.sum()),
        trigger_seconds=trigger_seconds,
        poison_seconds=poison_seconds,
        trigger=trigger.config(),
    )
    finish_run(run_dir)
    return _read(run_dir)


@from_job(EvaluateJob)
def evaluate(
    *,
    model_dir: str | Path,
    dataset: str | None,
    data_root: str | None,
    trigger_from: str | Path | None,
    feature_samples: int,
    batch_size: int,
    seed: int,
    device: str,
    out: str | Path | None,
    workers: int | None,
) -> dict[str, Any]:
    """ACC (and ASR under the run's own trigger, or another run's via ``trigger_from``).

    A run trained on streamed data is evaluated on its streamed evaluation split, with the
    same crop (``workers`` decode it)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    started = time.perf_counter()
    seed_everything(seed)
    dev = resolve_device(device)
    run = load_run(model_dir, dev)
    ds_meta = run.meta["dataset"]
    name = dataset or ds_meta["name"]
    if _streaming(name, False, run.meta):
        if feature_samples > 0:
            raise _not_streamable("--feature-samples", f"feature variance reads an in-memory "
                                                       f"test subset; {_IN_MEMORY_HINT}")
        splits, _ = _prepare_streamed(
            name, data_root or ds_meta.get("data_root"), ds_meta.get("resize"), None, seed
        )
    else:
        config.pop("workers")  # in-memory records keep their former config
        splits = load_dataset(
            name, data_root or ds_meta.get("data_root"), image_size=ds_meta.get("resize")
        )
    _check_model_fits(run.model, splits, "model")
    trigger, target = run.trigger, run.target
    if trigger_from is None and trigger is None:
        trigger_from = _distilled_from(run.meta)  # a student: its teacher's trigger, if any
    if trigger_from is not None:
        other = load_run(trigger_from, dev)
        if other.trigger is None:
            raise ConfigError(f"{trigger_from} carries no trigger")
        trigger, target = other.trigger, other.target
    extra: dict[str, Any] = {"trigger_from": str(trigger_from) if trigger_from else None}
    if is_unfinished(run.meta):
        _log(f"warning: {model_dir} is an unfinished run ({run.meta['epochs_done']} epochs "
             "done); these are the numbers of that checkpoint")
        extra["unfinished"] = True
    metrics = evaluate_model(
        run.model,
        splits.test,
        run.mean,
        run.std,
        trigger=trigger,
        target=target,
        device=dev,
        batch_size=batch_size,
        workers=workers,
    )
    if feature_samples > 0:
        layers = [layer.stage for layer in run.model.distill_layers()]
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(splits.test), generator=gen)[:feature_samples]
        var = feature_variance(
            run.model, layers, splits.test.subset(pick), run.mean, run.std, device=dev
        )
        extra["feature_variance"] = {
            k: {"mean": float(v.mean()), "values": v.tolist()} for k, v in var.items()
        }
        metrics.update({f"var_{k}": float(v.mean()) for k, v in var.items()})
    out_dir = Path(out) if out else Path(model_dir) / "evaluation"
    write_record(
        out_dir,
        command="evaluate",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
        model_dir=str(model_dir),
        **extra,
    )
    return _read(out_dir)


def _import_user_module(name: str):
    """Import a user's module; one in the current directory is found as ``python -m``
    would find it (the console script's path does not include the working directory)."""
    import importlib
    import sys

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        top = name.split(".")[0]
        local = Path(here, f"{top}.py").exists() or Path(here, top, "__init__.py").exists()
        if exc.name != top or not local or here in sys.path:
            raise
        sys.path.insert(0, here)
        return importlib.import_module(name)


def _distilled_from(meta: dict[str, Any]) -> str | None:
    """The teacher run a student was distilled from, when that run carries a trigger."""
    teacher = (meta.get("distillation") or {}).get("teacher")
    if not teacher or not (Path(teacher) / "meta.json").exists():
        return None
    try:
        return teacher if read_json(Path(teacher) / "meta.json").get("trigger") else None
    except (OSError, ValueError):
        return None


def load_factory(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a user model from ``MODULE:FUNC``, passing num_classes/in_channels if it takes them."""
    import inspect

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"factory {spec!r} must look like MODULE:FUNC (e.g. mypkg.nets:make)")
    try:
        func = getattr(_import_user_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load factory {spec!r}: {exc} (the module must be "
                          "importable: installed, on PYTHONPATH, or in the current "
                          "directory)") from None
    params = inspect.signature(func).parameters
    kwargs = {
        k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in params
    }
    model = func(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_weights_into(
    model: nn.Module, weights: str | Path, allow_pickle: bool, what: str
) -> None:
    state = load_state_dict(local_weights(weights), allow_pickle=allow_pickle)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"{weights} does not fit the {what}: {str(exc).splitlines()[0]} "
            "(check the architecture and the dataset's class count)"
        ) from None


def _check_output_classes(
    model: nn.Module, splits: DatasetSplits, what: str, device: torch.device
) -> None:
    """Probe one image: a model whose output size differs from the class count is an error."""
    x = torch.zeros(1, splits.train.channels, *splits.train.image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise ConfigError(
            f"the {what} cannot process {splits.name} images of shape "
            f"{tuple(x.shape[1:])}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
    if out.dim() != 2 or out.shape[1] != splits.num_classes:
        raise ConfigError(
            f"the {what} has {out.shape[-1]} output classes but dataset "
            f"{splits.name} has {splits.num_classes}"
        )


@from_job(DistillJob)
def distill(
    *,
    method: str,
    teacher: str | Path | None,
    teacher_factory: str | None,
    teacher_weights: str | Path | None,
    teacher_layers: list[str] | None,
    student: str | None,
    student_factory: str | None,
    student_layers: list[str] | None,
    allow_pickle: bool,
    trigger_from: str | Path | None,
    dataset: str | None,
    data_root: str | None,
    image_size: int | None,
    clean_fraction: float | None,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    schedule: str,
    weight_decay: float,
    momentum: float,
    options: dict[str, Any] | None,
    robustkd: dict[str, Any] | None,
    defense: str | None,
    defense_options: dict[str, Any] | None,
    seed: int,
    device: str,
    out: str | Path,
    resume: bool,
    amp: bool,
    channels_last: bool | None,
    progress: bool,
    eval_every: int,
    holdout: float | None,
    detox_from: str | Path | None,
    stream: bool,
    workers: int | None,
    clean_seed: int | None,
    overwrite: bool,
    allow_partial: bool,
) -> dict[str, Any]:
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
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    if clean_seed is None:  # records without it keep their former config
        config.pop("clean_seed")
    started = time.perf_counter()
    prepare_out(out, resume=resume, overwrite=overwrite, job=config,
                inputs={"--teacher": teacher, "--trigger-from": trigger_from,
                        "--detox-from": detox_from})
    started -= earlier_seconds(out, resume)
    seed_everything(seed)
    dev = resolve_device(device)
    trigger = target = None
    # which clean images the defender holds: fixed by clean_seed across student seeds
    subset_seed = seed if clean_seed is None else clean_seed
    if (teacher is None) == (teacher_factory is None):
        raise ConfigError(
            "give either --teacher RUN_DIR or --teacher-factory MODULE:FUNC "
            "with --teacher-weights FILE"
        )
    if teacher is not None:
        parent = load_teacher(teacher, dev, "--teacher", allow_partial)
        t_net, trigger, target = parent.model, parent.trigger, parent.target
        dataset = dataset or parent.meta["dataset"]["name"]
        data_root = data_root or parent.meta["dataset"].get("data_root")
        image_size = image_size or parent.meta["dataset"].get("resize")
        holdout = holdout or parent.meta["dataset"].get("holdout")
    elif dataset is None or teacher_weights is None:
        raise ConfigError("a factory teacher needs --teacher-weights FILE and --dataset NAME")
    streamed = _streaming(dataset, stream, parent.meta if teacher is not None else None)
    if streamed:
        config["stream"] = True
        _check_streamed_distill(method, defense)
        splits, train_ds = _prepare_streamed(
            dataset, data_root, image_size, clean_fraction, subset_seed, holdout,
            parent.meta["normalization"] if teacher is not None else None,
        )
    else:
        for key in ("stream", "workers"):  # in-memory records keep their former config
            config.pop(key)
        splits, train_ds = _prepare_data(
            dataset, data_root, image_size, clean_fraction, subset_seed, holdout=holdout
        )
    if teacher_factory is not None:
        t_net = load_factory(teacher_factory, splits.num_classes, splits.train.channels)
        _load_weights_into(t_net, teacher_weights, allow_pickle, "teacher")
        t_net.to(dev)
    if trigger_from is not None:
        other = load_run(trigger_from, dev)
        trigger, target = other.trigger, other.target
    _check_output_classes(t_net, splits, "teacher", dev)
    if (student is None) == (student_factory is None):
        raise ConfigError("give either --student NAME or --student-factory MODULE:FUNC")
    s_net = (
        build_model(student, num_classes=splits.num_classes, in_channels=splits.train.channels)
        if student_factory is None
        else load_factory(student_factory, splits.num_classes, splits.train.channels)
    )
    use_cl = _prepare_model(s_net, dev, channels_last)
    if use_cl:
        t_net.to(memory_format=torch.channels_last)
    _check_output_classes(s_net, splits, "student", dev)
    teacher_metrics = evaluate_model(
        t_net, splits.test, splits.mean, splits.std, trigger=trigger, target=target, device=dev,
        workers=workers,
    )
    run_dir = Path(out)
    write_job(run_dir, config)
    defense_report = None
    if defense is not None:  # clean a copy of the teacher first (METHOD.md 5.7 baselines)
        ctx = DefenseContext(
            clean=train_ds, mean=splits.mean, std=splits.std, augment=splits.augment,
            device=dev, seed=seed, layers=teacher_layers, test=splits.test, trigger=trigger,
            target=target, amp=amp, channels_last=use_cl, progress=progress,
        )
        t_net, defense_report = defend_teacher(
            defense, t_net, ctx, defense_options, run_dir=run_dir, resume=resume
        )
        _log(f"defence {defense}: cleaned teacher {defense_report['cleaned_teacher_metrics']}")
    elif defense_options:
        raise ConfigError("defence settings need a defence (--defense finetune|nad)")
    history: list[dict] = []

    def meta(extra: dict) -> dict:
        return run_meta(
            s_net,
            splits,
            data_root,
            seed,
            role="student",
            image_size_arg=image_size,
            distillation={
                "method": method,
                "options": options or {},
                "teacher": str(teacher or teacher_factory),
                "clean_images": len(train_ds),
                "defense": defense,
            },
            factory=student_factory,
            **extra,
        )

    _log(
        f"distill ({method}) {teacher or teacher_factory} -> {student or student_factory} on "
        f"{len(train_ds)} clean images of {splits.name}, {epochs} epochs; teacher "
        f"{teacher_metrics}"
    )
    optim = OptimConfig(
        name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule
    )
    common = dict(
        mean=splits.mean,
        std=splits.std,
        augment=splits.augment,
        epochs=epochs,
        optim=optim,
        batch_size=batch_size,
        device=dev,
        seed=seed,
        trigger=trigger,
        target=target,
        progress=progress,
        channels_last=use_cl,
        amp=amp,
        state_dir=run_dir / STATE_DIR,
        resume=resume,
        on_epoch_end=_epoch_logger(run_dir, s_net, meta, None, history, started),
    )
    extra: dict[str, Any] = {}
    if method == "robustkd":
        rk_cfg = robustkd_config(robustkd)
        reuse_masks = reuse_triggers = None
        if detox_from is not None:
            reuse_masks, reuse_triggers = load_detox(detox_from)

        def fresh_student() -> nn.Module:
            net = (
                build_model(
                    student, num_classes=splits.num_classes, in_channels=splits.train.channels
                )
                if student_factory is None
                else load_factory(student_factory, splits.num_classes, splits.train.channels)
            ).to(dev)
            return net.to(memory_format=torch.channels_last) if use_cl else net

        report = run_robustkd(
            t_net,
            s_net,
            train_ds,
            splits.test,
            rk_cfg,
            fkd_options=options,
            student_factory=fresh_student,
            teacher_layers=teacher_layers,
            student_layers=student_layers,
            reuse_masks=reuse_masks,
            reuse_triggers=reuse_triggers,
            eval_every=eval_every,
            **common,
        )
        masks = report.pop("masks")
        synthetic = report.pop("synthetic_triggers")
        save_tensors(
            run_dir / DETOX_FILE,
            {**masks.tensors(), **(synthetic.tensors() if synthetic is not None else {})},
        )
        write_json(
            run_dir / DETOX_META,
            {**masks.config(), "config": rk_cfg.as_dict(), "teacher": str(teacher)},
        )
        with tap(t_net, replace=masks.replacements()):
            detoxed = evaluate_model(
                t_net,
                splits.test,
                splits.mean,
                splits.std,
                trigger=trigger,
                target=target,
                device=dev,
            )
        extra = {
            "robustkd": {
                **report,
                "config": rk_cfg.as_dict(),
                "detoxified_teacher_metrics": detoxed,
            },
            "selection": report["selection"],
            "chosen_tau": report["chosen_tau"],
            "detox_seconds": report["detox_seconds"],
            "distill_seconds": report["distill_seconds"],
        }
    else:
        if robustkd:
            raise ConfigError(
                f"detoxification options only apply to --method robustkd, not {method}"
            )
        started_distill = time.perf_counter()
        done, _ = distill_student(
            t_net,
            s_net,
            train_ds,
            splits.test,
            method=method,
            teacher_layers=teacher_layers,
            student_layers=student_layers,
            options=options,
            eval_every=eval_every,
            workers=workers,
            **common,
        )
        extra = {"distill_seconds": time.perf_counter() - started_distill}
        history[:] = [h.as_dict() for h in done]  # includes epochs restored by --resume
    if defense_report is not None:
        extra.update(defense=defense_report, defense_seconds=defense_report["seconds"])
    metrics = evaluate_model(
        s_net, splits.test, splits.mean, splits.std, trigger=trigger, target=target, device=dev,
        workers=workers,
    )
    save_run_model(run_dir, s_net, meta({"metrics": metrics, "complete": True}))
    write_record(
        run_dir,
        command="distill",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
        teacher_metrics=teacher_metrics,
        history=history,
        throughput=_throughput(history),
        clean_images=len(train_ds),
        **extra,
    )
    finish_run(run_dir)
    return _read(run_dir)


def load_detox(run_dir: str | Path):
    """The detox masks (and synthetic triggers, if any) a RobustKD run saved, for reuse."""
    run_dir = Path(run_dir)
    if not (run_dir / DETOX_FILE).exists() or not (run_dir / DETOX_META).exists():
        raise ConfigError(
            f"{run_dir} has no {DETOX_FILE}/{DETOX_META}; give the run directory of an earlier "
            "`robustkd distill --method robustkd`"
        )
    tensors = load_file(str(run_dir / DETOX_FILE))
    masks = DetoxMasks.from_saved(read_json(run_dir / DETOX_META), tensors)
    return masks, SyntheticTriggers.from_tensors(tensors)


@from_job(ImportJob)
def import_weights(
    *,
    model: str,
    weights: str | Path,
    dataset: str,
    data_root: str | None,
    image_size: int | None,
    allow_pickle: bool,
    device: str,
    seed: int,
    overwrite: bool,
    out: str | Path,
) -> dict[str, Any]:
    """Turn an external weights file (e.g. from a model hub) into a run directory.

    safetensors files load as they are; pickle files only with ``allow_pickle`` (and then with
    ``weights_only=True``). The result is evaluated so the record shows what was imported.
    """
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    started = time.perf_counter()
    prepare_out(out, overwrite=overwrite)
    dev = resolve_device(device)
    splits = load_dataset(dataset, data_root, image_size=image_size)
    net = build_model(model, num_classes=splits.num_classes, in_channels=splits.train.channels)
    _load_weights_into(net, weights, allow_pickle, f"{model} for {splits.num_classes} classes")
    net.to(dev)
    metrics = evaluate_model(net, splits.test, splits.mean, splits.std, device=dev)
    save_run_model(
        out,
        net,
        run_meta(
            net,
            splits,
            data_root,
            seed,
            role="imported",
            image_size_arg=image_size,
            source=str(weights),
            metrics=metrics,
            complete=True,
        ),
    )
    write_record(
        out,
        command="import",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
    )
    return _read(out)


@from_job(ScanJob)
def scan(
    *,
    model_dir: str | Path,
    reference: str | Path | None,
    samples: int,
    dataset: str | None,
    data_root: str | None,
    seed: int,
    device: str,
    out: str | Path | None,
) -> dict[str, Any]:
    """Per-layer feature-variance statistics on clean test images (paper Fig. 2), with a
    comparison against a reference model and a histogram PNG when matplotlib is present."""

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    started = time.perf_counter()
    dev = resolve_device(device)
    run = load_run(model_dir, dev)
    ds_meta = run.meta["dataset"]
    splits = load_dataset(
        dataset or ds_meta["name"],
        data_root or ds_meta.get("data_root"),
        image_size=ds_meta.get("resize"),
    )
    pick = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(seed))
    images = splits.test.subset(pick[:samples])
    layers = [layer.stage for layer in run.model.distill_layers()]
    values = feature_variance(run.model, layers, images, run.mean, run.std, device=dev)
    ref_values = ref_layers = None
    if reference is not None:
        ref = load_run(reference, dev)
        ref_layers = [layer.stage for layer in ref.model.distill_layers()]
        ref_values = feature_variance(ref.model, ref_layers, images, ref.mean, ref.std, device=dev)
    stats, lines = summarise(layers, values, ref_values, ref_layers)
    out_dir = Path(out) if out else Path(model_dir) / "scan"
    png = plot_histograms(
        out_dir / "variance.png",
        layers,
        values,
        ref_values,
        (str(model_dir), str(reference)),
        ref_layers,
    )
    for line in lines:
        _log(line)
    metrics = {f"var_{k}": v["model"]["mean"] for k, v in stats.items()}
    metrics.update({f"ratio_{k}": v["ratio"] for k, v in stats.items() if "ratio" in v})
    write_record(
        out_dir,
        command="scan",
        metrics=metrics,
        config=config,
        seed=seed,
        device=describe_device(dev),
        seconds=time.perf_counter() - started,
        layers=stats,
        summary=lines,
        figure=str(png) if png else None,
        values={k: v.tolist() for k, v in values.items()},
    )
    return _read(out_dir)


def _throughput(history: list[dict]) -> dict[str, float]:
    """Median training images/s over epochs (the first epoch includes warm-up)."""
    rates = sorted(h["images_per_second"] for h in history)
    return {"median_images_per_second": rates[len(rates) // 2]} if rates else {}


def _read(run_dir: str | Path) -> dict[str, Any]:
    ddp.barrier()  # under torchrun only rank 0 wrote the record: wait for it
    return read_json(Path(run_dir) / RECORD_FILE)
