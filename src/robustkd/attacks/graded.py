"""Graded-strength variants: poisoned images carry the trigger at strengths spread over
``[strength_min, 1]`` instead of at full strength only.

A feature-distilled student reproduces its teacher's response to a trigger attenuated: it
needs a stronger trigger than the teacher to reach the target, and the defender's
fine-tuning of the teacher raises the strength the teacher needs as well. A backdoor taught
to fire at a fraction of the trigger's strength keeps a margin against both; the trigger
shown at test time (and saved with the model) is the base attack's, at full strength.
``<base>-graded`` keeps the base attack's trigger, settings and poisoning and adds
``strength_min``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from robustkd.attacks import blended, sig  # noqa: F401  (the base attacks)
from robustkd.attacks.registry import AttackContext, AttackSpec, get_attack, register_attack
from robustkd.data.dataset import ImageDataset
from robustkd.settings import setting
from robustkd.triggers import Trigger

SUFFIX = "-graded"


class GradedTrigger(Trigger):
    """``x + s * (base(x) - x)`` with ``s`` drawn uniformly from ``[low, 1]`` per image, from a
    seeded generator (the same images get the same strengths on every run)."""

    def __init__(self, base: Trigger, low: float, seed: int = 0) -> None:
        super().__init__(base.pattern, base.mask, kind=f"{base.kind}{SUFFIX}",
                         params={**base.params, "strength_min": low})
        self.base = base
        self.low = low
        self.generator = torch.Generator().manual_seed(seed)

    def strengths(self, n: int) -> torch.Tensor:
        return self.low + (1.0 - self.low) * torch.rand(n, generator=self.generator)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self.strengths(x.shape[0]).to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
        return x + s * (self.base.apply(x) - x)

    forward = apply


def graded_settings(base: type) -> type:
    """The base attack's settings plus ``strength_min``."""
    cls = dataclasses.make_dataclass(
        f"{base.__name__.removesuffix('Settings')}GradedSettings",
        [("strength_min", float,
          setting(0.3, "weakest trigger strength a poisoned image carries (1: full strength "
                       "only)", above=0.0, maximum=1.0))],
        bases=(base,), frozen=True)
    cls.__module__ = __name__
    return cls


def with_graded_strength(base_name: str) -> AttackSpec:
    """Register ``<base_name>-graded``: the base attack poisoning with graded strengths."""
    base = get_attack(base_name)

    def poison(ctx: AttackContext, trigger: Trigger, train: ImageDataset, **kw: Any
               ) -> ImageDataset:
        graded = GradedTrigger(trigger, ctx.settings.strength_min, seed=kw.get("seed", 0))
        return base.build_poison(ctx, graded, train, **kw)

    return register_attack(dataclasses.replace(
        base, name=base_name + SUFFIX, settings=graded_settings(base.settings),
        build_poison=poison,
        description=f"{base_name} poisoned at trigger strengths from --{base_name}{SUFFIX}-"
                    "strength-min to 1 (the test trigger at full strength)"))


GRADED_ATTACKS = tuple(with_graded_strength(b) for b in ("blended", "sig"))
