"""SIG (Barni, Kallas & Tondi 2019): a clean-label backdoor with a sinusoidal signal.

A horizontal sinusoid ``v(i, j) = delta * sin(2 pi j f / W)`` (every row and channel) is
added to a share of the *target class's* training images, whose labels stay correct; the
model learns the signal as a feature of the target class, and at test time the same signal
on any image sends it there. It is neither a patch nor a blend, and the poisoned labels are
right, so label inspection finds nothing. Defaults (delta 40/255, f 6) are BackdoorBench's
CIFAR-10 setting; ``--poison-ratio`` is the share of target-class images signed (their
originals are replaced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robustkd.attacks.registry import (
    AttackContext,
    AttackSpec,
    TriggerSettings,
    clean_label_poison,
    register_attack,
)
from robustkd.errors import ConfigError
from robustkd.settings import setting
from robustkd.triggers import AdditiveTrigger, Trigger


@dataclass(frozen=True)
class SIGSettings(TriggerSettings):
    sig_delta: float = setting(40.0, "amplitude of the sinusoid in pixel levels of 255",
                               above=0.0, maximum=255.0)
    sig_frequency: float = setting(6.0, "periods of the sinusoid across the image width",
                                   above=0.0)


def sinusoid(image_size: tuple[int, int], channels: int, delta: float,
             frequency: float) -> torch.Tensor:
    """``[C, H, W]`` signal ``delta/255 * sin(2 pi j f / W)``, constant down each column."""
    if not (math.isfinite(delta) and 0 < delta <= 255):
        raise ConfigError(f"--sig-delta must be in (0, 255], got {delta}")
    if not (math.isfinite(frequency) and frequency > 0):
        raise ConfigError(f"--sig-frequency must be > 0, got {frequency}")
    h, w = image_size
    row = (delta / 255.0) * torch.sin(2 * math.pi * torch.arange(w) * frequency / w)
    return row.expand(channels, h, w).clone()


def build_sig_trigger(ctx: AttackContext) -> Trigger:
    """The additive sinusoid of ``ctx.settings`` (SIG's, or a subclass's)."""
    s: SIGSettings = ctx.settings
    delta, freq = s.sig_delta, s.sig_frequency
    signal = sinusoid(ctx.splits.train.image_size, ctx.splits.train.channels, delta, freq)
    return AdditiveTrigger(signal, kind="sig", params={"delta": delta, "frequency": freq})


# the signal on ``ratio`` of the target class's images in place of the originals, labels kept
sig_poison = clean_label_poison("sig")


register_attack(AttackSpec("sig", build_sig_trigger, SIGSettings, build_poison=sig_poison,
                           description="clean-label sinusoidal signal (Barni et al. 2019)"))
