"""Deterministic per-class subsets and train/validation splits.

Randomness comes from numpy's PCG64 generator seeded with ``(seed, class index)``, so
the rows chosen for a class depend only on the seed, the class and the rows of that
class: never on torch's (or numpy's) global RNG state or on the other classes.
Returned datasets keep the original row order.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np
import torch

from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError


class _Rows(Protocol):
    """What the subset rules need: labels, a class count and ``subset(index)``. Both
    :class:`ImageDataset` and a streamed file list
    (:class:`~robustkd.data.streaming.StreamedImageFolder`) have them, so one rule serves
    in-memory and streamed data and picks the same rows of the same file order."""

    labels: torch.Tensor

    @property
    def num_classes(self) -> int: ...

    def subset(self, index: torch.Tensor) -> _Rows: ...


D = TypeVar("D", bound=_Rows)


def _class_rows(ds: _Rows) -> list[np.ndarray]:
    labels = ds.labels.cpu().numpy()
    return [np.flatnonzero(labels == c) for c in range(ds.num_classes)]


def _shuffled(rows: np.ndarray, seed: int, cls: int) -> np.ndarray:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, cls]).permutation(rows)


def per_class_subset(
    ds: D,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> D:
    """Keep ``round(fraction * n_c)`` (at least 1) or ``min(per_class, n_c)`` rows of each class.

    Exactly one of ``fraction`` (in (0, 1]) and ``per_class`` (>= 1) must be given.
    Classes without rows stay empty.
    """
    index = per_class_rows(ds, fraction, per_class, seed)
    return ds.subset(torch.from_numpy(index.astype(np.int64)))


def per_class_rows(
    ds: _Rows,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The sorted rows of ``ds`` that :func:`per_class_subset` keeps."""
    if (fraction is None) == (per_class is None):
        raise ConfigError("per_class_subset: give exactly one of fraction and per_class")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"per_class_subset: fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"per_class_subset: per_class must be >= 1, got {per_class}")
    keep = []
    for c, rows in enumerate(_class_rows(ds)):
        n = len(rows)
        if n == 0:
            continue
        k = max(1, round(fraction * n)) if fraction is not None else per_class
        keep.append(_shuffled(rows, seed, c)[: min(k, n)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def split_validation(
    ds: ImageDataset, fraction: float, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` per class into disjoint ``(train_part, val_part)``.

    Each class with ``n_c >= 2`` rows gives ``round(fraction * n_c)`` of them (at least 1,
    at most ``n_c - 1``) to the validation part; a class with a single row stays in train.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"split_validation: fraction must be in (0, 1), got {fraction}")
    val_rows = []
    for c, rows in enumerate(_class_rows(ds)):
        n = len(rows)
        if n < 2:
            continue
        k = min(max(1, round(fraction * n)), n - 1)
        val_rows.append(_shuffled(rows, seed, c)[:k])
    val = np.sort(np.concatenate(val_rows)) if val_rows else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(ds), dtype=bool)
    mask[val] = False
    train = np.flatnonzero(mask)
    return (
        ds.subset(torch.from_numpy(train.astype(np.int64))),
        ds.subset(torch.from_numpy(val.astype(np.int64))),
    )
