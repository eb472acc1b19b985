"""A cross-fitted teacher: copies of one teacher, each cleaned without one fold of the
defender's images, and the fold of every image.

Distillation reads each image's features from the copy that never trained on it
(``distill_student`` sends each batch, one fold at a time, to that copy), so the student
does not imitate a teacher fitted to the student's own images. A tuned teacher fits the
images it was tuned on: its accuracy there stays at the original's while on the other
training images it falls to its test accuracy (docs/RESULTS.md, session 23).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from robustkd.errors import ConfigError


class FoldedTeacher(nn.Module):
    """``copies[k]`` was cleaned without the images of fold ``k``; ``folds[i]`` is the fold
    of row ``i`` of the defender's clean data. Called on other images (evaluation), it
    answers with the copies' mean logits."""

    def __init__(self, copies: Sequence[nn.Module], folds: torch.Tensor) -> None:
        super().__init__()
        folds = torch.as_tensor(folds, dtype=torch.long)
        if len(copies) < 2:
            raise ConfigError(f"a cross-fitted teacher needs at least 2 copies, got {len(copies)}")
        if folds.numel() and (int(folds.min()) < 0 or int(folds.max()) >= len(copies)):
            raise ConfigError(f"folds must lie in 0..{len(copies) - 1}")
        self.copies = nn.ModuleList(copies)
        self.register_buffer("folds", folds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([c(x) for c in self.copies]).mean(0)

    @classmethod
    def like(cls, teacher: nn.Module, copies: int, rows: int) -> FoldedTeacher:
        """An empty folded teacher of ``teacher``'s shape, to load saved weights into."""
        return cls([copy.deepcopy(teacher) for _ in range(copies)],
                   torch.zeros(rows, dtype=torch.long))


def assign_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold of each row: every class's rows in a seeded order, dealt to the folds in turn,
    so each fold holds about 1/folds of every class."""
    if folds < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds, got {folds}")
    labels = torch.as_tensor(labels).cpu().numpy()
    out = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c)]).permutation(rows)
        out[rows] = np.arange(len(rows)) % folds
    return torch.from_numpy(out)
