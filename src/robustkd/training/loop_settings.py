"""What every training loop here shares: how it reads data and how it runs.

Distillation, detoxification, teacher defences and RobustKD all take one
:class:`LoopSettings` instead of re-declaring the same ten keywords, so a new runtime knob
(a device option, a numerics switch) is added here once and reaches every loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LoopSettings:
    """Normalisation and augmentation of the clean data, batch size, device, seed,
    numerics (bf16 autocast, channels-last, ``torch.compile`` of the step's loss), progress
    bars and decoding workers."""

    mean: Sequence[float]
    std: Sequence[float]
    augment: dict[str, Any] | None = None
    batch_size: int = 128
    device: torch.device | str = "cpu"
    seed: int = 0
    amp: bool = True
    channels_last: bool = False
    progress: bool = True
    workers: int | None = None
    compile: bool = False
