"""Adaptive CKD (RobustKD paper section 5.2.5, Table 7): CKD by an attacker who knows the
defence.

RobustKD detoxifies the features whose per-example variance is high, because backdoors
raise it (the paper's Finding 2). This attacker builds the CKD trigger as usual and, while
poison-fine-tuning, adds ``mu * mean_batch Var(F^L(x))``: the per-example variance of the
last distillation layer's stage output (where RobustKD's masks act and Eq. 8 measures it),
so the backdoored teacher looks as calm as a clean one.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import nn

from robustkd.attacks.ckd import build_ckd_trigger, ckd_arguments
from robustkd.attacks.learned import learned_trigger_arguments
from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.attacks.triggers import Trigger
from robustkd.data.dataset import ImageDataset
from robustkd.distill.base import layers_of
from robustkd.errors import ConfigError

VARIANCE_INPUTS = ("all", "poison", "clean")


def _arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adaptive-ckd")
    g.add_argument("--variance-weight", type=float, default=1.0,
                   help="mu: weight of the per-example feature-variance penalty (default 1; "
                        "the paper does not give its value)")
    g.add_argument("--variance-layer", default=None,
                   help="module whose output variance is lowered (default: the last "
                        "distillation layer's stage output)")
    g.add_argument("--variance-on", default="all", choices=VARIANCE_INPUTS,
                   help="which training images the penalty covers: all, only the triggered "
                        "poisons, or only clean ones")


def variance_loss(model: nn.Module, ctx: AttackContext, train: ImageDataset):
    """The :class:`ExtraLoss` adding ``mu * mean per-example variance`` of one layer."""
    # imported here: training and defences import the attacks package
    from robustkd.defenses.detox import per_example_variance
    from robustkd.training.classifier import ExtraLoss

    o = ctx.options
    mu = float(o.get("variance_weight", 1.0))
    on = o.get("variance_on", "all")
    if on not in VARIANCE_INPUTS:
        raise ConfigError(f"--variance-on must be one of {VARIANCE_INPUTS}, got {on!r}")
    if mu < 0:
        raise ConfigError(f"--variance-weight must be >= 0, got {mu}")
    layer = o.get("variance_layer") or layers_of(model)[-1].stage
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
    trigger.params["variance_weight"] = float(ctx.options.get("variance_weight", 1.0))
    return trigger


register_attack(AttackSpec("adaptive-ckd", _build, _arguments, needs_model=True,
                           description="CKD plus a feature-variance penalty while poisoning "
                                       "(an attacker who knows RobustKD)",
                           shared_arguments=(learned_trigger_arguments, ckd_arguments),
                           extra_loss=_extra_loss))
