"""Defences: RobustKD feature detoxification, and the teacher-cleaning baselines
(fine-tuning, NAD, ANP, I-BAU) registered by name for ``robustkd distill --defense``."""

from robustkd.defenses import anp, finetune, ibau, nad  # noqa: F401  (register the defences)
from robustkd.defenses.registry import (
    TEACHER_DEFENSES,
    DefenseContext,
    defend_teacher,
    get_teacher_defense,
    register_teacher_defense,
)

__all__ = ["TEACHER_DEFENSES", "DefenseContext", "defend_teacher", "get_teacher_defense",
           "register_teacher_defense"]
