"""Blended (Chen et al. 2017): a full-image pattern mixed in with weight alpha."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.attacks.triggers import Trigger, blend_trigger
from robustkd.errors import ConfigError


def _arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("blended")
    group.add_argument("--alpha", type=float, default=0.15, help="blend weight of the pattern")
    group.add_argument("--blend-pattern", default="noise",
                       help="noise, stripes, or the path of an image file")


def _build(ctx: AttackContext) -> Trigger:
    pattern = ctx.options.get("blend_pattern", "noise")
    if pattern not in ("noise", "stripes"):
        try:
            with Image.open(pattern) as img:
                mode = "L" if ctx.splits.train.channels == 1 else "RGB"
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
        except OSError as exc:
            raise ConfigError(f"cannot read blend pattern image {pattern}: {exc}") from None
        pattern = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
    return blend_trigger(ctx.splits.train.image_size, ctx.splits.train.channels,
                         alpha=ctx.options.get("alpha", 0.15), pattern=pattern,
                         seed=ctx.options.get("trigger_seed", 0))


register_attack(AttackSpec("blended", _build, _arguments,
                           description="full-image blend of a pattern (Chen et al. 2017)"))
