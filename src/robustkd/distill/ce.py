"""Student-only training: cross-entropy on the clean labels, the lower baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustkd.distill.base import Distiller, register_method


@register_method
class StudentOnly(Distiller):
    name = "ce"
    reads_teacher = False

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.student(x)
        return F.cross_entropy(logits, y), {"train_acc": (logits.argmax(1) == y).sum()}
