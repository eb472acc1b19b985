"""Blended (Chen et al. 2017): a full-image pattern mixed in with weight alpha."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from robustkd.attacks.registry import AttackContext, AttackSpec, TriggerSettings, register_attack
from robustkd.errors import ConfigError
from robustkd.settings import setting
from robustkd.triggers import Trigger, blend_trigger


@dataclass(frozen=True)
class BlendedSettings(TriggerSettings):
    alpha: float = setting(0.15, "blend weight of the pattern", above=0.0, maximum=1.0)
    blend_pattern: str = setting("noise", "noise, stripes, or the path of an image file",
                                 metavar="PATTERN")


def _build(ctx: AttackContext) -> Trigger:
    s: BlendedSettings = ctx.settings
    pattern = s.blend_pattern
    if pattern not in ("noise", "stripes"):
        try:
            with Image.open(pattern) as img:
                mode = "L" if ctx.splits.train.channels == 1 else "RGB"
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
        except OSError as exc:
            raise ConfigError(f"cannot read blend pattern image {pattern}: {exc}") from None
        pattern = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
    return blend_trigger(ctx.splits.train.image_size, ctx.splits.train.channels,
                         alpha=s.alpha, pattern=pattern, seed=s.trigger_seed)


register_attack(AttackSpec("blended", _build, BlendedSettings,
                           description="full-image blend of a pattern (Chen et al. 2017)"))
