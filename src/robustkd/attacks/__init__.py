"""Backdoor attacks: triggers, poisoning and the attack registry."""

from robustkd.attacks import badnets, blended, ckd, lba  # noqa: F401  (registers the attacks)
from robustkd.attacks.poison import poison_dataset, select_poison_indices, triggered_test_set
from robustkd.attacks.registry import ATTACKS, AttackContext, AttackSpec, get_attack
from robustkd.attacks.triggers import Trigger, blend_trigger, patch_trigger

__all__ = [
    "ATTACKS", "AttackContext", "AttackSpec", "Trigger", "blend_trigger", "get_attack",
    "patch_trigger", "poison_dataset", "select_poison_indices", "triggered_test_set",
]
