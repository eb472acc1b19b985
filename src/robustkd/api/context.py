"""What every command does around its computation, in one place: its log, the checks of
its run directory, its wall clock (a resumed run counts its earlier time), a checkpoint per
epoch, and the final record it returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkd import distributed as ddp
from robustkd.io import RECORD_FILE, read_json
from robustkd.jobs import Job
from robustkd.outputs import earlier_seconds, finish_run, prepare_out, write_job
from robustkd.runs import save_run_model, write_record
from robustkd.training.loop import EpochResult, precision_name
from robustkd.triggers import Trigger
from robustkd.utils import describe_device

MetaFn = Callable[[dict[str, Any]], dict[str, Any]]


def log(message: str) -> None:
    if ddp.is_main():  # under torchrun every rank runs the command; one log is enough
        tqdm.write(message)


def job_config(job: Job) -> dict[str, Any]:
    """The settings a record's ``config`` shows: the job's API keywords (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in job.flat().items()}


@dataclass
class RunContext:
    """One command's run: its ``config`` as recorded, the directory its record goes to, its
    seed and device, and when it started (``perf_counter``)."""

    command: str
    config: dict[str, Any]
    out: Path
    seed: int
    device: torch.device | None = None
    started: float = field(default_factory=time.perf_counter)

    def open(self, *, resume: bool = False, overwrite: bool = False,
             inputs: Mapping[str, str | Path | None] | None = None) -> None:
        """Check the run directory before anything loads (:func:`prepare_out`); a resumed
        run's clock goes back by the time its interrupted part spent."""
        prepare_out(self.out, resume=resume, overwrite=overwrite, inputs=inputs,
                    job=self.config)
        self.started -= earlier_seconds(self.out, resume)

    def save_job(self) -> None:
        write_job(self.out, self.config)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def epoch_logger(self, model: nn.Module, meta: MetaFn, trigger: Trigger | None,
                     history: list[dict]) -> Callable[[EpochResult], None]:
        """Print a line per epoch and write a checkpoint per epoch (atomically); the meta
        keeps the wall time so far, earlier runs included."""

        def on_epoch_end(result: EpochResult) -> None:
            history.append(result.as_dict())
            parts = [f"epoch {result.epoch}", f"loss {result.loss:.4f}"]
            parts += [f"{k} {v:.4f}" for k, v in {**result.stats, **result.extra}.items()]
            parts.append(f"{result.images_per_second:.0f} img/s")
            log("  ".join(parts))
            save_run_model(self.out, model,
                           meta({"epochs_done": result.epoch, "last_epoch": result.as_dict(),
                                 "elapsed_seconds": self.seconds()}),
                           trigger)

        return on_epoch_end

    def record(self, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
        """Write ``record.json`` (the one result file) and return it as read back."""
        self._write(metrics, extra)
        return read_record(self.out)

    def finish(self, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
        """:meth:`record`, dropping the resume state a finished run no longer needs."""
        self._write(metrics, extra)
        finish_run(self.out)
        return read_record(self.out)

    def _write(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        write_record(self.out, command=self.command, metrics=metrics, config=self.config,
                     seed=self.seed, device=describe_device(self.device),
                     # a command without an amp setting trains nothing: fp32 evaluation
                     precision=precision_name(self.device, bool(self.config.get("amp", False))),
                     seconds=self.seconds(), **extra)


def throughput(history: list[dict]) -> dict[str, float]:
    """Median training images/s over epochs (the first epoch includes warm-up)."""
    rates = sorted(h["images_per_second"] for h in history)
    return {"median_images_per_second": rates[len(rates) // 2]} if rates else {}


def read_record(run_dir: str | Path) -> dict[str, Any]:
    ddp.barrier()  # under torchrun only rank 0 wrote the record: wait for it
    return read_json(Path(run_dir) / RECORD_FILE)
