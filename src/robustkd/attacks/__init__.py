"""Backdoor attacks: triggers, poisoning and the attack registry."""

from robustkd.attacks import (  # noqa: F401  (registers the attacks)
    adaptive_ckd,
    badnets,
    blended,
    ckd,
    clean_label,
    collision,
    graded,
    htba,
    lba,
    neuron_noise,
    sig,
)
from robustkd.attacks.poison import poison_dataset, select_poison_indices
from robustkd.attacks.registry import ATTACKS, AttackContext, AttackSpec, get_attack
from robustkd.evaluation.metrics import triggered_test_set
from robustkd.triggers import (
    AdditiveTrigger,
    RandomPatchTrigger,
    Trigger,
    blend_trigger,
    patch_trigger,
    random_patch_trigger,
)

__all__ = [
    "ATTACKS", "AdditiveTrigger", "AttackContext", "AttackSpec", "RandomPatchTrigger",
    "Trigger", "blend_trigger", "get_attack", "patch_trigger", "poison_dataset",
    "random_patch_trigger", "select_poison_indices", "triggered_test_set",
]
