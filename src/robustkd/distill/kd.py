"""Hinton et al. 2015: match the teacher's temperature-softened outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustkd.distill.base import Distiller, register_method
from robustkd.distill.losses import kd_loss
from robustkd.settings import setting


@dataclass(frozen=True)
class KDSettings:
    temperature: float = setting(4.0, "softmax temperature", above=0.0)
    alpha: float = setting(0.9, "weight of the soft-target term (1 - alpha: cross-entropy)",
                           minimum=0.0, maximum=1.0)


@register_method
class HintonKD(Distiller):
    name = "kd"
    settings = KDSettings

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        t_logits = self.logit_teacher_forward(x)
        s_logits = self.student(x)
        loss = kd_loss(s_logits, t_logits, y, self.options["temperature"], self.options["alpha"])
        return loss, {"train_acc": (s_logits.argmax(1) == y).sum()}
