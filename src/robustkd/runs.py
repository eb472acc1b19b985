"""Run directories: what a trained model carries with it, and how to get it back.

A run directory holds ``model.safetensors`` (weights, plus the trigger tensors for a
backdoored model), ``meta.json`` (how to rebuild the model and feed it data) and
``record.json`` (the results of the command that produced it).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd import __version__
from robustkd.data.dataset import DatasetSplits
from robustkd.data.streaming import StreamedSplits
from robustkd.errors import ConfigError
from robustkd.io import RECORD_FILE, load_checkpoint, save_checkpoint, write_json
from robustkd.models import build_model
from robustkd.triggers import Trigger
from robustkd.utils import git_revision


def dataset_meta(splits: DatasetSplits | StreamedSplits, data_root: str | None,
                 image_size_arg: int | None = None) -> dict[str, Any]:
    """How to load the same data again (``resize`` is the --image-size the run was given).

    Streamed data add ``streamed`` (crop, resize, source; see ``StreamedSplits.describe``):
    later runs from this one (``distill --teacher``, ``evaluate``) then stream too.
    """
    meta = {
        "name": splits.name,
        "data_root": str(Path(data_root).resolve()) if data_root else None,
        "resize": image_size_arg,
        "classes": list(splits.classes),
        "num_classes": splits.num_classes,
        "channels": splits.train.channels,
        "image_size": list(splits.train.image_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "augment": splits.augment,
        "holdout": splits.holdout,
    }
    if isinstance(splits, StreamedSplits):
        meta["streamed"] = splits.describe()
    return meta


def run_meta(model: nn.Module, splits: DatasetSplits | StreamedSplits, data_root: str | None,
             seed: int, trigger: Trigger | None = None, target: int | None = None,
             image_size_arg: int | None = None, **extra: Any) -> dict[str, Any]:
    meta = {
        "arch": getattr(model, "arch", None),
        "arch_kwargs": getattr(model, "arch_kwargs", None),
        "dataset": dataset_meta(splits, data_root, image_size_arg),
        "normalization": {"mean": list(splits.mean), "std": list(splits.std)},
        "seed": seed,
        "git_rev": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trigger": None,
    }
    if trigger is not None:
        meta["trigger"] = {**trigger.config(), "target": target}
    meta.update(extra)
    return meta


def save_run_model(run_dir: str | Path, model: nn.Module, meta: dict[str, Any],
                   trigger: Trigger | None = None) -> None:
    save_checkpoint(run_dir, model, meta, extra_tensors=trigger.tensors() if trigger else None)


@dataclass
class LoadedRun:
    model: nn.Module
    meta: dict[str, Any]
    trigger: Trigger | None
    target: int | None

    @property
    def mean(self) -> list[float]:
        return self.meta["normalization"]["mean"]

    @property
    def std(self) -> list[float]:
        return self.meta["normalization"]["std"]


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory (safetensors only) with its trigger, if any."""
    state, meta, extra = load_checkpoint(run_dir)
    if not meta.get("arch"):
        raise ConfigError(f"{run_dir}/meta.json does not name a built-in architecture")
    model = build_model(meta["arch"], **meta["arch_kwargs"])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"{run_dir}: weights do not fit {meta['arch']} "
                          f"({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ConfigError(f"{run_dir}: weights do not fit {meta['arch']} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    trigger = target = None
    if meta.get("trigger"):
        trigger = Trigger.from_saved(meta["trigger"], extra).to(device)
        target = meta["trigger"].get("target")
    return LoadedRun(model.to(device), meta, trigger, target)


def is_unfinished(meta: dict[str, Any]) -> bool:
    """A checkpoint written mid-training (epochs done, never marked complete)."""
    return "epochs_done" in meta and not meta.get("complete")


def load_teacher(run_dir: str | Path, device: torch.device | str, flag: str,
                 allow_partial: bool = False) -> LoadedRun:
    """:func:`load_run` for a model a command builds on: an interrupted run is refused (its
    weights are those of an early epoch, not the model the user trained) unless
    ``allow_partial``."""
    run = load_run(run_dir, device)
    if is_unfinished(run.meta) and not allow_partial:
        raise ConfigError(f"{flag} {run_dir} is an unfinished run ({run.meta['epochs_done']} "
                          "epochs done, never completed): finish it with --resume first, or "
                          "pass --allow-partial to use that checkpoint")
    return run


def write_record(run_dir: str | Path, *, command: str, metrics: dict[str, float],
                 config: dict[str, Any], seed: int, device: str, seconds: float,
                 **extra: Any) -> Path:
    """The one result file per command; tables and figures are rendered from these."""
    record = {
        "command": command,
        "metrics": metrics,
        "config": config,
        "seed": seed,
        "git_rev": git_revision(),
        "versions": {"robustkd": __version__, "torch": torch.__version__,
                     "python": platform.python_version(), "platform": platform.platform()},
        "device": device,
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    return write_json(Path(run_dir) / RECORD_FILE, record)
