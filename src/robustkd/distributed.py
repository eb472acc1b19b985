"""Single-node data parallelism for the one training loop (``torchrun`` + DDP semantics).

``torchrun --nproc_per_node N -m robustkd <command> ...`` starts N copies of the same
command. Every copy builds the same model from the same seed and iterates the same
deterministic loader (loaders are seeded by ``(seed, epoch)``), so every rank sees the
same *global* batch; :func:`shard_batch` keeps this rank's contiguous slice of it.

Why not ``nn.parallel.DistributedDataParallel``: ``fit`` optimises whatever it is given —
module parameters, param-group dicts, or plain tensors such as RobustKD's detox masks and
learned trigger patterns — so there is not always a module to wrap. Instead the loop
all-reduces gradients explicitly after ``backward()``. The maths is DDP's: every rank ends
each step with the same averaged gradient, so identical replicas take identical optimiser
steps. The average is weighted by shard size (:func:`all_reduce_gradients`), which makes it
the exact gradient of the global batch's mean loss even when the last batch does not split
evenly. Unlike DDP, communication is not overlapped with the backward pass (one coalesced
all-reduce per step after it); for the model sizes here that is a small cost.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here initialises anything and
:func:`is_distributed` is False, so the loop takes exactly its single-process path.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_tensors",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "shard_batch",
    "shard_bounds",
    "world_size",
]


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment; True when distributed.

    Does nothing (and returns False) unless ``WORLD_SIZE`` > 1. With CUDA available the CUDA
    device is set from ``LOCAL_RANK`` first (so ``--device cuda``/``auto`` puts rank r on
    GPU r) and the backend is ``cuda:nccl,cpu:gloo``: NCCL for every CUDA tensor, gloo for
    CPU tensors, object collectives and barriers, so ``--device cpu`` still works on a GPU
    machine. Without CUDA it is ``gloo`` (what the tests use). Idempotent: a second call, or
    a call after the caller initialised the process group itself, is a no-op. The group is
    destroyed at interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op when not distributed. Every rank must call it."""
    if is_distributed():
        dist.barrier()


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank_``'s contiguous share of ``n`` items.

    Sizes differ by at most one (the first ``n % world`` ranks get one more), like
    ``torch.tensor_split``; with ``n < world`` the last ranks get an empty share.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, rest = divmod(n, w)
    start = r * base + min(r, rest)
    return start, start + base + (1 if r < rest else 0)


def shard_batch(x: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of a global batch ``(x, y, idx)`` (views, no copies).

    Every rank iterates the same deterministic loader, so the slices of all ranks are
    disjoint and together are exactly the global batch. Returns the batch unchanged when
    not distributed.
    """
    if not is_distributed():
        return x, y, idx
    start, end = shard_bounds(x.shape[0])
    return x[start:end], y[start:end], idx[start:end]


def _coalesced(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Run the collective ``op`` once per (device, dtype) on a flat copy of ``tensors`` and
    copy the result back (one message instead of one per tensor; strides are preserved)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        op(flat)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape))
                offset += n


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (parameters, buffers).

    Every rank must pass the same tensors in the same order. No-op when not distributed.
    """
    if not is_distributed():
        return
    tensors = [t for t in tensors if t.numel() > 0]
    _coalesced(tensors, lambda flat: dist.broadcast(flat, src))


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over ranks (epoch loss sums, statistics, sample counts)."""
    if not is_distributed():
        return
    _coalesced([t for t in tensors if t.numel() > 0], lambda flat: dist.all_reduce(flat))


def all_reduce_gradients(params: Iterable[torch.Tensor], weight: float | None = None) -> None:
    """Give every rank the same gradient: ``sum over ranks of weight_r * grad_r``.

    With ``weight = local_n / global_n`` and each rank's gradient taken of its shard's *mean*
    loss, the result is exactly the gradient of the global batch's mean loss, also for
    unequal (or empty) shards; ``weight=None`` is ``1 / world_size``, DDP's plain average.
    A parameter whose gradient is ``None`` on every rank keeps ``None`` (so optimisers skip
    it as they would in one process); one that has a gradient on some rank gets the reduced
    gradient everywhere (zeros standing in for the missing ones). One all-reduce per
    (device, dtype), the presence flags riding in the same message; the host reads them
    (a sync) only when this rank is missing a gradient.
    """
    if not is_distributed():
        return
    w = 1.0 / world_size() if weight is None else float(weight)
    params = [p for p in params if p.requires_grad]
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise NotImplementedError("sparse gradients are not supported in distributed fit")
        buckets.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), group in buckets.items():
        local = [p.grad is not None for p in group]
        total = sum(p.numel() for p in group)
        parts = [p.grad.detach().reshape(-1) if p.grad is not None
                 else torch.zeros(p.numel(), device=device, dtype=dtype) for p in group]
        flags = (torch.ones(len(group), device=device, dtype=dtype) if all(local)  # no H2D copy
                 else torch.tensor(local, device=device, dtype=dtype))
        flat = torch.cat([*parts, flags])
        flat[:total].mul_(w)
        dist.all_reduce(flat)
        # Only when this rank lacks a gradient (an unused parameter, an empty last shard)
        # must the host learn which gradients exist elsewhere; otherwise no host sync.
        present = local if all(local) else (flat[total:] > 0).tolist()
        offset = 0
        with torch.no_grad():
            for p, has in zip(group, present, strict=True):
                n = p.numel()
                if has:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(flat[offset:offset + n].view(p.shape))
                offset += n
