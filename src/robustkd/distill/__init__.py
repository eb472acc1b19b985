"""Distillation methods (registry) and the student training entry point."""

from robustkd.distill import ce, fkd, kd  # noqa: F401  (register the methods)
from robustkd.distill.base import METHODS, Distiller, DistillSetup, get_method
from robustkd.distill.run import FKD_SCHEDULE, DistillRun, build_distiller, distill_student
from robustkd.models.layers import layers_of

__all__ = ["FKD_SCHEDULE", "METHODS", "DistillRun", "DistillSetup", "Distiller", "build_distiller",
           "distill_student", "get_method", "layers_of"]
