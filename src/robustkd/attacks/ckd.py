"""CKD ("cheat KD"): a learned trigger that drives the clean teacher's strongest channels.

Toxic channels are the top-rho fraction of each distillation layer's channels by mean
clean activation; the trigger pulls them to one high value (the layer's largest channel
mean). Feature distillation copies exactly these strong channels, and with them the trigger
response. Then the teacher is poison-fine-tuned with the trigger.
"""

from __future__ import annotations

import argparse

import torch

from robustkd.attacks.learned import (
    feature_names,
    learned_trigger_arguments,
    optimise_trigger,
    trigger_images,
)
from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.attacks.triggers import Trigger
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import mean_features


def toxic_channels(channel_means: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(fraction * C)`` channels with the largest mean activation."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"toxic fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * channel_means.numel())))
    return torch.topk(channel_means, k).indices


def ckd_arguments(parser: argparse.ArgumentParser) -> None:
    """CKD's flags (shared with adaptive-ckd, which builds the same trigger)."""
    g = parser.add_argument_group("ckd, adaptive-ckd")
    g.add_argument("--toxic-fraction", type=float, default=0.1,
                   help="fraction of channels per layer treated as toxic (rho)")


def build_ckd_trigger(ctx: AttackContext, kind: str = "ckd") -> Trigger:
    """Pick toxic channels on the clean teacher and optimise the trigger that drives them."""
    if ctx.model is None:
        raise ConfigError(f"{kind} optimises its trigger on a clean teacher: use --teacher "
                          "RUN_DIR, or --model NAME with --trigger-teacher RUN_DIR")
    o = ctx.options
    splits, model, device = ctx.splits, ctx.model, ctx.device
    names = feature_names(model, o.get("feature_layers"))
    images = trigger_images(splits.train, o.get("trigger_images", 2000), o.get("trigger_seed", 0))
    means = mean_features(model, images, names, splits.mean, splits.std, device=device)
    fraction = o.get("toxic_fraction", 0.1)
    toxic, values = {}, {}
    for n in names:
        channel_means = means[n].mean((1, 2)) if means[n].dim() == 3 else means[n]
        toxic[n] = toxic_channels(channel_means, fraction)
        values[n] = float(channel_means.max())

    def loss(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum over layers and toxic channels of mean((F_c(x') - v_l)^2) over batch and space."""
        total = 0.0
        for n in names:
            sel = feats[n].float()[:, toxic[n]]
            dims = [0, *range(2, sel.dim())]
            total = total + ((sel - values[n]) ** 2).mean(dim=dims).sum()
        return total

    mask_max = o.get("mask_max") or 0.2
    return optimise_trigger(
        model, images, names, loss, mask_max=mask_max, mean=splits.mean, std=splits.std,
        device=device, epochs=o.get("trigger_epochs", 5), lr=o.get("trigger_lr", 0.005),
        seed=o.get("trigger_seed", 0), kind=kind,
        params={"toxic_fraction": fraction, "layers": names,
                "toxic_channels": {n: toxic[n].tolist() for n in names},
                "target_values": values},
        progress=o.get("progress", True))


register_attack(AttackSpec("ckd", build_ckd_trigger, needs_model=True,
                           description="learned trigger on the teacher's strongest channels "
                                       "(CKD, survives feature distillation)",
                           shared_arguments=(learned_trigger_arguments, ckd_arguments)))
