"""The one training loop: teachers, poisoning, distillation, detox masks and defences.

Callers supply the parameters to optimise and a ``step`` closure that maps a batch to a
loss (plus optional tensors to sum for logging). The loop owns the optimiser, the
schedule, autocast, progress, per-epoch callbacks and resumable state. Nothing inside the
step loop moves a value to the host on CUDA except every ``log_every`` steps for the
progress bar.

Under ``torchrun`` (see ``training/distributed.py`` and ``docs/distributed.md``) the same
loop runs data parallel: replicas start from rank 0's parameters and buffers, each rank
steps on its slice of every global batch, gradients are all-reduced (weighted by shard size)
after ``backward()``, buffers are re-broadcast from rank 0 and the logged sums all-reduced
at each epoch end, and only rank 0 shows progress and writes state. Without it none of
that runs: not one extra collective or host sync.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from robustkd import distributed as ddp
from robustkd.errors import TrainingError
from robustkd.io import save_tensors, write_json
from robustkd.training.host_memory import keep_freed_memory
from robustkd.training.optim import OptimConfig, build_optimizer, lr_factor, set_lr

StepOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor]]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], StepOutput]
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass
class EpochResult:
    """Per-epoch summary handed to callbacks and returned by :func:`fit`."""

    epoch: int
    loss: float
    stats: dict[str, float]
    lr: float
    seconds: float
    images: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "loss": self.loss, "lr": self.lr, "seconds": self.seconds,
                "images": self.images, "images_per_second": self.images_per_second,
                **self.stats, **self.extra}


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 / AMX), where autocast
    speeds training up instead of emulating bf16 slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


_CPU_BF16 = cpu_has_bf16()
# progress bars only on a terminal: redirected to a file they are kilobytes of noise
_TERMINAL = sys.stderr.isatty()


def bf16_in_effect(device: torch.device, amp: bool) -> bool:
    """Whether ``amp`` means bf16 autocast on ``device``: on CUDA, and on CPUs with native
    bf16; elsewhere the step stays in float32."""
    device = torch.device(device)
    return amp and (device.type == "cuda" or (device.type == "cpu" and _CPU_BF16))


def precision_name(device: torch.device | str, amp: bool) -> str:
    """``bf16`` or ``fp32``: the arithmetic a run's steps used, recorded with its wall time
    (timings of different arithmetic are not comparable)."""
    return "bf16" if bf16_in_effect(device, amp) else "fp32"


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast (no grad scaler needed) where :func:`bf16_in_effect`; otherwise
    nothing."""
    device = torch.device(device)
    if bf16_in_effect(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    params: Iterable[torch.Tensor] | Iterable[dict],
    step: StepFn,
    loader,
    epochs: int,
    optim: OptimConfig,
    *,
    train_modules: Iterable[nn.Module] = (),
    state_modules: Mapping[str, nn.Module] | None = None,
    state_tensors: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    amp: bool = True,
    after_step: Callable[[], None] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 50,
) -> list[EpochResult]:
    """Optimise ``params`` for ``epochs`` epochs of ``loader`` with loss ``step(x, y, idx)``.

    ``train_modules`` are switched to train mode at each epoch start (callbacks may have
    switched them to eval). ``state_modules``/``state_tensors`` are saved to ``state_dir``
    after every epoch together with the optimiser, so ``resume=True`` continues an
    interrupted run from its last finished epoch with the same data order.

    Data parallel under ``torchrun`` (``distributed.is_distributed()``): ``loader`` yields the
    same *global* batches on every rank and ``step`` sees this rank's slice; ``step`` must
    return the *mean* loss of the batch it is given (stats: per-batch sums), so the
    shard-size-weighted gradient all-reduce equals the gradient of the global batch mean.
    Logged loss/stats/images are global; ``on_epoch_end`` runs on every rank with identical
    replicas (buffers broadcast from rank 0, as DDP does); ``state_dir`` is written by rank 0.
    """
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse the last step's pages
    train_modules = list(train_modules)
    opt = build_optimizer(params, optim)
    history: list[EpochResult] = []
    start_epoch = 0
    if resume and state_dir is not None and (Path(state_dir) / STATE_JSON).exists():
        start_epoch, history = _load_state(Path(state_dir), opt, state_modules, state_tensors)
    steps_per_epoch = len(loader)
    distributed = ddp.is_distributed()
    if distributed:
        trained = [p for group in opt.param_groups for p in group["params"]]
        buffers = _buffers([*train_modules, *(state_modules or {}).values()])
        ddp.broadcast_tensors([*trained, *buffers])
        progress = progress and ddp.is_main()

    for epoch in range(start_epoch, epochs):
        for module in train_modules:
            module.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        stat_sums: dict[str, torch.Tensor] = {}
        seen = 0
        started = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}",
                   disable=not progress or not _TERMINAL, leave=False, dynamic_ncols=True)
        for i, (x, y, idx) in enumerate(bar):
            set_lr(opt, lr_factor(epoch, i, steps_per_epoch, epochs, optim))
            if distributed:
                global_n = x.shape[0]
                x, y, idx = ddp.shard_batch(x, y, idx)
                if x.shape[0] == 0:  # a last batch smaller than the world: nothing to do here
                    opt.zero_grad(set_to_none=True)
                    ddp.all_reduce_gradients(trained, 0.0)
                    opt.step()
                    if after_step is not None:
                        after_step()
                    continue
            with autocast_for(device, amp):
                out = step(x, y, idx)
            loss, stats = (out if isinstance(out, tuple) else (out, {}))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if distributed:
                ddp.all_reduce_gradients(trained, x.shape[0] / global_n)
            opt.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.detach().float() * x.shape[0]
            for key, value in stats.items():
                stat_sums[key] = stat_sums.get(key, 0) + value.detach().float()
            seen += x.shape[0]
            if progress and (i + 1) % log_every == 0:
                bar.set_postfix(loss=f"{(loss_sum / max(seen, 1)).item():.4f}")
        bar.close()
        if distributed:
            loss_sum, stat_sums, seen = _reduce_epoch(loss_sum, stat_sums, seen, device)
            ddp.broadcast_tensors(buffers)  # DDP's choice: rank 0's BN running statistics
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        result = EpochResult(
            epoch=epoch + 1,
            loss=float(loss_sum / max(seen, 1)),
            stats={k: float(v) / max(seen, 1) for k, v in stat_sums.items()},
            lr=opt.param_groups[0]["lr"],
            seconds=seconds,
            images=seen,
        )
        if not math.isfinite(result.loss):
            # nothing of this epoch is saved: the last finished epoch's checkpoint and state
            # stay as they were, so the run resumes from there with a changed setting
            raise TrainingError(
                f"{desc}: the training loss became {result.loss} in epoch {epoch + 1} (a "
                f"learning rate of {optim.lr} may be too high); the run is not marked "
                f"complete and resumes from epoch {epoch} with --resume")
        if on_epoch_end is not None:
            on_epoch_end(result)
        history.append(result)
        if state_dir is not None and (not distributed or ddp.is_main()):
            _save_state(Path(state_dir), epoch + 1, history, opt, state_modules, state_tensors)
    return history


def _buffers(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The buffers (BN running statistics, ...) of ``modules``, each once."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for buf in module.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                out.append(buf)
    return out


def _reduce_epoch(loss_sum: torch.Tensor, stat_sums: dict[str, torch.Tensor], seen: int,
                  device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Global epoch sums: the loss, each statistic and the sample count summed over ranks.

    The statistic names are gathered first, so a rank that never stepped (an empty shard in
    every batch) still joins the same collective with zeros.
    """
    names: list[list[str]] = [[] for _ in range(ddp.world_size())]
    torch.distributed.all_gather_object(names, sorted(stat_sums))
    keys = sorted({k for part in names for k in part})
    f64 = torch.float64  # exact sample counts far beyond float32's 2**24
    parts = [loss_sum.to(f64), torch.tensor(float(seen), device=device, dtype=f64)]
    parts += [torch.as_tensor(stat_sums.get(k, 0.0), device=device).to(f64).reshape(())
              for k in keys]
    values = torch.stack(parts)
    ddp.all_reduce_sum([values])
    return values[0], dict(zip(keys, values[2:], strict=True)), int(values[1].item())


def _save_state(state_dir: Path, epoch: int, history: list[EpochResult],
                opt: torch.optim.Optimizer, modules: Mapping[str, nn.Module] | None,
                tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Everything needed to resume, without pickle: tensors in safetensors, the rest in JSON."""
    flat: dict[str, torch.Tensor] = {}
    for name, module in (modules or {}).items():
        for key, value in module.state_dict().items():
            flat[f"module.{name}.{key}"] = value
    for name, value in (tensors or {}).items():
        flat[f"tensor.{name}"] = value
    opt_state = opt.state_dict()
    scalars: dict[str, dict] = {}
    for pid, pstate in opt_state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                flat[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    save_tensors(state_dir / STATE_TENSORS, flat)
    write_json(state_dir / STATE_JSON, {
        "epoch": epoch,
        "history": [
            {"epoch": h.epoch, "loss": h.loss, "stats": h.stats, "lr": h.lr,
             "seconds": h.seconds, "images": h.images, "extra": h.extra} for h in history
        ],
        "param_groups": opt_state["param_groups"],
        "optim_scalars": scalars,
    })


def _load_state(state_dir: Path, opt: torch.optim.Optimizer,
                modules: Mapping[str, nn.Module] | None,
                tensors: Mapping[str, torch.Tensor] | None) -> tuple[int, list[EpochResult]]:
    meta = json.loads((state_dir / STATE_JSON).read_text())
    flat = load_file(str(state_dir / STATE_TENSORS), device="cpu")
    for name, module in (modules or {}).items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in flat.items()
                                if k.startswith(prefix)})
    for name, value in (tensors or {}).items():
        with torch.no_grad():
            value.copy_(flat[f"tensor.{name}"])
    state: dict[int, dict] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    history = [EpochResult(**h) for h in meta["history"]]
    return int(meta["epoch"]), history
