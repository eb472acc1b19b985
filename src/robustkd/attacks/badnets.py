"""BadNets (Gu et al. 2017): a small fixed patch in a corner."""

from __future__ import annotations

import argparse

from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.attacks.triggers import Trigger, patch_trigger


def patch_arguments(parser: argparse.ArgumentParser) -> None:
    """Patch flags shared by the patch attacks (badnets; htba, which places it at random)."""
    group = parser.add_argument_group("patch triggers (badnets, htba)")
    group.add_argument("--patch-size", type=int, default=3,
                       help="patch side in pixels of a 32x32 image (badnets: scales with the "
                            "shorter side of larger images, e.g. 3 -> 21 at 224 px)")
    group.add_argument("--patch-position", default="br",
                       help="badnets: br, bl, tr, tl, center, or ROW,COL")
    group.add_argument("--patch-pattern", default="checkerboard",
                       choices=["checkerboard", "white", "random"])


def _build(ctx: AttackContext) -> Trigger:
    pos = ctx.options.get("patch_position", "br")
    if isinstance(pos, str) and "," in pos:
        pos = tuple(int(v) for v in pos.split(","))
    return patch_trigger(ctx.splits.train.image_size, ctx.splits.train.channels,
                         size=ctx.options.get("patch_size", 3), position=pos,
                         pattern=ctx.options.get("patch_pattern", "checkerboard"),
                         seed=ctx.options.get("trigger_seed", 0))


register_attack(AttackSpec("badnets", _build,
                           description="fixed patch in a corner (Gu et al. 2017)",
                           shared_arguments=(patch_arguments,)))
