"""Clean-label variants of poison-label attacks: the trigger goes on target-class images only.

SIG is the one attack on the benchmark whose backdoor crosses feature distillation at every
amplitude tried, and it differs from Blended and BadNets (which do not cross) in two ways:
its trigger and its poisoning. ``<base>-clean-label`` keeps the base attack's trigger and
settings and poisons as SIG does (a share of the target class's images carry the trigger,
labels untouched), so the two can be told apart: the model must learn the trigger as a
feature of the target class rather than as a label rule.
"""

from __future__ import annotations

import dataclasses

from robustkd.attacks import badnets, blended  # noqa: F401  (the base attacks)
from robustkd.attacks.registry import (
    AttackSpec,
    clean_label_poison,
    get_attack,
    register_attack,
)
from robustkd.errors import ConfigError

SUFFIX = "-clean-label"


def with_clean_label(base_name: str) -> AttackSpec:
    """Register ``<base_name>-clean-label``: the base attack's trigger, clean-label poisoning
    (``--poison-ratio`` is the share of target-class images triggered)."""
    base = get_attack(base_name)
    if base.build_poison is not AttackSpec.build_poison:
        raise ConfigError(f"attack {base_name} already poisons its own way")
    name = base_name + SUFFIX
    return register_attack(dataclasses.replace(
        base, name=name, build_poison=clean_label_poison(name),
        description=f"{base_name}'s trigger on a share of the target class's images, labels "
                    f"kept (clean-label, poisoned as SIG)"))


CLEAN_LABEL_ATTACKS = tuple(with_clean_label(b) for b in ("blended", "badnets"))
