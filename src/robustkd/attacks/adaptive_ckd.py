"""Adaptive CKD (RobustKD paper section 5.2.5, Table 7): CKD by an attacker who knows the
defence.

RobustKD detoxifies the features whose per-example variance is high, because backdoors
raise it (the paper's Finding 2). This attacker builds the CKD trigger as usual and, while
poison-fine-tuning, adds ``mu * mean_batch Var(F^L(x))``: the per-example variance of the
last distillation layer's stage output (where RobustKD's masks act and Eq. 8 measures it),
so the backdoored teacher looks as calm as a clean one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from robustkd.attacks.ckd import CKDSettings, build_ckd_trigger
from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.data.dataset import ImageDataset
from robustkd.evaluation.metrics import per_example_variance
from robustkd.models.layers import layers_of
from robustkd.settings import setting
from robustkd.training.classifier import ExtraLoss
from robustkd.triggers import Trigger

VARIANCE_INPUTS = ("all", "poison", "clean")


@dataclass(frozen=True)
class AdaptiveCKDSettings(CKDSettings):
    variance_weight: float = setting(1.0, "mu: weight of the per-example feature-variance "
                                          "penalty (the paper does not give its value)",
                                     minimum=0.0)
    variance_layer: str | None = setting(None, "module whose output variance is lowered "
                                               "(default: the last distillation layer's stage "
                                               "output)", metavar="MODULE")
    variance_on: str = setting("all", "which training images the penalty covers: all, only "
                                      "the triggered poisons, or only clean ones",
                               choices=VARIANCE_INPUTS)


def variance_loss(model: nn.Module, ctx: AttackContext, train: ImageDataset):
    """The :class:`ExtraLoss` adding ``mu * mean per-example variance`` of one layer."""
    s: AdaptiveCKDSettings = ctx.settings
    mu, on = s.variance_weight, s.variance_on
    layer = s.variance_layer or layers_of(model)[-1].stage
    is_poison = train.is_poison.clone()

    def fn(feats: Mapping[str, torch.Tensor], _logits: torch.Tensor, _y: torch.Tensor,
           idx: torch.Tensor) -> torch.Tensor:
        var = per_example_variance(feats[layer])
        if on != "all":
            keep = is_poison[idx.cpu()].to(var.device)
            keep = keep if on == "poison" else ~keep
            return mu * (var * keep).sum() / keep.sum().clamp_min(1)
        return mu * var.mean()

    return ExtraLoss(fn, layers=[layer], name="variance_loss")


def _extra_loss(ctx: AttackContext, model: nn.Module, train: ImageDataset):
    return variance_loss(model, ctx, train)


def _build(ctx: AttackContext) -> Trigger:
    trigger = build_ckd_trigger(ctx, kind="adaptive-ckd")
    trigger.params["variance_weight"] = ctx.settings.variance_weight
    return trigger


register_attack(AttackSpec("adaptive-ckd", _build, AdaptiveCKDSettings, needs_model=True,
                           description="CKD plus a feature-variance penalty while poisoning "
                                       "(an attacker who knows RobustKD)",
                           extra_loss=_extra_loss))
