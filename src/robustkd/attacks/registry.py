"""Attack registry: each attack file registers how to build its trigger and the settings
dataclass that holds its defaults (the CLI flags are generated from it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import nn

from robustkd.attacks.poison import poison_dataset, poison_target_class
from robustkd.data.dataset import DatasetSplits, ImageDataset
from robustkd.errors import ConfigError
from robustkd.settings import make_settings, setting
from robustkd.training.classifier import ExtraLoss
from robustkd.triggers import Trigger


@dataclass(frozen=True)
class TriggerSettings:
    """What every attack takes: the seed of its trigger's randomness."""

    trigger_seed: int = setting(0, "seed of the trigger's random pattern or optimisation",
                                minimum=0)


@dataclass
class AttackContext:
    """What a trigger builder may look at: the data, the (clean) model, its settings."""

    splits: DatasetSplits
    model: nn.Module | None
    settings: Any = TriggerSettings()
    device: Any = "cpu"
    target: int = 0
    progress: bool = True


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
# a context entered around the poison training (hooks on the model, e.g. neuron noise)
TrainingHooks = Callable[[AttackContext, nn.Module], AbstractContextManager]


def clean_label_poison(tag: str) -> BuildPoison:
    """Clean-label poisoning (SIG's, and every ``<base>-clean-label``): ``ratio`` of the target
    class's images triggered in place, labels kept (``keep_originals`` does not apply)."""

    def poison(ctx: AttackContext, trigger: Trigger, train: ImageDataset, *, target: int,
               ratio: float, keep_originals: bool = True, seed: int = 0) -> ImageDataset:
        return poison_target_class(train, trigger, target, ratio, seed=seed, tag=tag)

    return poison


@dataclass
class AttackSpec:
    """How an attack builds its trigger and poisoned data; ``settings`` is its dataclass.

    ``build_poison`` defaults to relabel-and-trigger; clean-label attacks (HTBA) replace it.
    ``extra_loss``, when set, adds a term to the fine-tuning loss (adaptive attacks);
    ``trainable``, when set, may restrict fine-tuning to a submodule (HTBA's last layer);
    ``training_hooks``, when set, is entered around the poison training (forward hooks that
    change what the model computes while it learns, removed before it is saved).
    """

    name: str
    build_trigger: Callable[[AttackContext], Trigger]
    settings: type = TriggerSettings
    description: str = ""
    build_poison: BuildPoison = relabel_poison
    extra_loss: BuildExtraLoss | None = None
    trainable: Trainable | None = None
    training_hooks: TrainingHooks | None = None
    # the trigger is optimised on a clean model (from scratch: ``--trigger-teacher RUN``)
    needs_model: bool = False

    def make_settings(self, options: dict[str, Any] | None) -> Any:
        """The attack's settings from its defaults and the options a user gave."""
        return make_settings(self.settings, options, f"attack {self.name}",
                             flags=self.name)


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS:
        raise ConfigError(f"attack {spec.name!r} is registered twice")
    ATTACKS[spec.name] = spec
    return spec


def register_variant(base_name: str, suffix: str, *, setting_name: str, setting_type: type,
                     field: Any, record: str, description: str, module: str,
                     **changes: Any) -> AttackSpec:
    """Register ``<base_name><suffix>``: the base attack's trigger and poisoned data with one
    more setting (``setting_name``, its dataclass ``field``; the trigger records its value as
    ``params[record]``) and the spec fields ``changes`` (training hooks, an extra loss), which
    the base must not have already."""
    base = get_attack(base_name)
    for key in changes:
        if getattr(base, key) is not None:
            raise ConfigError(f"attack {base_name} already has {key}")
    settings = dataclasses.make_dataclass(
        f"{base.settings.__name__}{suffix.title().replace('-', '')}",
        [(setting_name, setting_type, field)], bases=(base.settings,), frozen=True)
    settings.__module__ = module

    def build(ctx: AttackContext) -> Trigger:
        trigger = base.build_trigger(ctx)
        trigger.params[record] = getattr(ctx.settings, setting_name)
        return trigger

    return register_attack(dataclasses.replace(
        base, name=base_name + suffix, build_trigger=build, settings=settings,
        description=description, **changes))


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; available: {sorted(ATTACKS)}")
    return ATTACKS[name]
