"""Defences: RobustKD feature detoxification, and the teacher-cleaning baselines
(fine-tuning, FST, NAD, ANP, I-BAU) registered by name for ``robustkd distill --defense``; both
reach the distill command as teacher transforms (:mod:`robustkd.defenses.transforms`)."""

# importing them registers the defences and RobustKD's transform
from robustkd.defenses import (  # noqa: F401
    anp,
    crossfit,
    finetune,
    fst,
    ibau,
    nad,
    robustkd_transform,
)
from robustkd.defenses.registry import (
    TEACHER_DEFENSES,
    DefenseContext,
    defend_teacher,
    get_teacher_defense,
    register_teacher_defense,
)
from robustkd.defenses.transforms import (
    TRANSFORMS,
    TeacherTransform,
    TransformContext,
    Transformed,
    chosen_transform,
    find_transform,
    get_transform,
    register_transform,
    teacher_transforms,
    transform_names,
)

__all__ = ["TEACHER_DEFENSES", "TRANSFORMS", "DefenseContext", "TeacherTransform",
           "TransformContext", "Transformed", "chosen_transform", "defend_teacher",
           "find_transform", "get_teacher_defense", "get_transform", "register_teacher_defense",
           "register_transform", "teacher_transforms", "transform_names"]
