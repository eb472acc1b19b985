"""Hinton et al. 2015: match the teacher's temperature-softened outputs."""

from __future__ import annotations

import torch

from robustkd.distill.base import Distiller, register_method
from robustkd.distill.losses import kd_loss


@register_method
class HintonKD(Distiller):
    name = "kd"
    defaults = {"temperature": 4.0, "alpha": 0.9}

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        t_logits, _ = self.teacher_forward(x)
        s_logits = self.student(x)
        loss = kd_loss(s_logits, t_logits, y, self.options["temperature"], self.options["alpha"])
        return loss, {"train_acc": (s_logits.argmax(1) == y).sum()}
