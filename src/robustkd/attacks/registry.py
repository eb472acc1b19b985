"""Attack registry: each attack file registers how to build its trigger and its CLI flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from robustkd.attacks.triggers import Trigger
from robustkd.data.dataset import DatasetSplits
from robustkd.errors import ConfigError


@dataclass
class AttackContext:
    """What a trigger builder may look at: the data, the (clean) model, the options."""

    splits: DatasetSplits
    model: nn.Module | None
    options: dict[str, Any]
    device: Any = "cpu"


@dataclass
class AttackSpec:
    name: str
    build_trigger: Callable[[AttackContext], Trigger]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # flag groups several attacks share (added once to the CLI, deduplicated by identity)
    shared_arguments: tuple[Callable[[argparse.ArgumentParser], None], ...] = ()


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
