"""BadNets (Gu et al. 2017): a small fixed patch in a corner."""

from __future__ import annotations

from dataclasses import dataclass

from robustkd.attacks.registry import AttackContext, AttackSpec, TriggerSettings, register_attack
from robustkd.settings import setting
from robustkd.triggers import Trigger, patch_trigger

PATTERNS = ("checkerboard", "white", "random")


@dataclass(frozen=True)
class PatchSettings(TriggerSettings):
    """The patch the patch attacks paste (badnets in a corner, htba at random places)."""

    patch_size: int = setting(3, "patch side in pixels of a 32x32 image (badnets: scales "
                                 "with the shorter side of larger images, 3 -> 21 at 224 px)",
                              minimum=1)
    patch_pattern: str = setting("checkerboard", "the patch's pixels", choices=PATTERNS)


@dataclass(frozen=True)
class BadNetsSettings(PatchSettings):
    patch_position: str = setting("br", "br, bl, tr, tl, center, or ROW,COL",
                                  metavar="POSITION")
    patch_margin: int = setting(1, "pixels between a corner patch and the image border (of a "
                                   "32x32 image; scales like the patch)", minimum=0)


def _build(ctx: AttackContext) -> Trigger:
    s: BadNetsSettings = ctx.settings
    pos = s.patch_position
    if "," in pos:
        pos = tuple(int(v) for v in pos.split(","))
    return patch_trigger(ctx.splits.train.image_size, ctx.splits.train.channels,
                         size=s.patch_size, position=pos, margin=s.patch_margin,
                         pattern=s.patch_pattern, seed=s.trigger_seed)


register_attack(AttackSpec("badnets", _build, BadNetsSettings,
                           description="fixed patch in a corner (Gu et al. 2017)"))
