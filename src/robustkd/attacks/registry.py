"""Attack registry: each attack file registers how to build its trigger and its CLI flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from robustkd.attacks.poison import poison_dataset
from robustkd.attacks.triggers import Trigger
from robustkd.data.dataset import DatasetSplits, ImageDataset
from robustkd.errors import ConfigError

if TYPE_CHECKING:
    from robustkd.training.classifier import ExtraLoss


@dataclass
class AttackContext:
    """What a trigger builder may look at: the data, the (clean) model, the options."""

    splits: DatasetSplits
    model: nn.Module | None
    options: dict[str, Any]
    device: Any = "cpu"


def relabel_poison(ctx: AttackContext, trigger: Trigger, train: ImageDataset, *, target: int,
                   ratio: float, keep_originals: bool = True, seed: int = 0) -> ImageDataset:
    """The default poisoning: trigger a ``ratio`` of each non-target class, relabel to target."""
    return poison_dataset(train, trigger, target, ratio, keep_originals=keep_originals, seed=seed)


# builds the poisoned training set: (ctx, trigger, train, target=, ratio=, keep_originals=, seed=)
BuildPoison = Callable[..., ImageDataset]
# builds a term added to the poison fine-tuning loss: (ctx, model, poisoned train) -> ExtraLoss
BuildExtraLoss = Callable[[AttackContext, nn.Module, ImageDataset], "ExtraLoss | None"]
# picks the submodule poison fine-tuning trains (None: the whole model)
Trainable = Callable[[AttackContext, nn.Module], "nn.Module | None"]


@dataclass
class AttackSpec:
    """How an attack builds its trigger and poisoned data, and which CLI flags it takes.

    ``build_poison`` defaults to relabel-and-trigger; clean-label attacks (HTBA) replace it.
    ``extra_loss``, when set, adds a term to the fine-tuning loss (adaptive attacks);
    ``trainable``, when set, may restrict fine-tuning to a submodule (HTBA's last layer).
    """

    name: str
    build_trigger: Callable[[AttackContext], Trigger]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # flag groups several attacks share (added once to the CLI, deduplicated by identity)
    shared_arguments: tuple[Callable[[argparse.ArgumentParser], None], ...] = ()
    build_poison: BuildPoison = relabel_poison
    extra_loss: BuildExtraLoss | None = None
    trainable: Trainable | None = None
    # the trigger is optimised on a clean model (from scratch: ``--trigger-teacher RUN``)
    needs_model: bool = False


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS:
        raise ConfigError(f"attack {spec.name!r} is registered twice")
    ATTACKS[spec.name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; available: {sorted(ATTACKS)}")
    return ATTACKS[name]
