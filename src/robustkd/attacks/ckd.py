"""CKD ("cheat KD"): a learned trigger that drives the clean teacher's strongest channels.

Toxic channels are the top-rho fraction of each distillation layer's channels by mean
clean activation; the trigger pulls them to one high value (the layer's largest channel
mean). Feature distillation copies exactly these strong channels, and with them the trigger
response. Then the teacher is poison-fine-tuned with the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustkd.attacks.learned import (
    LearnedTriggerSettings,
    feature_names,
    optimise_trigger,
    trigger_images,
)
from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import mean_features
from robustkd.settings import setting
from robustkd.triggers import Trigger


def toxic_channels(channel_means: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(fraction * C)`` channels with the largest mean activation."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"toxic fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * channel_means.numel())))
    return torch.topk(channel_means, k).indices


@dataclass(frozen=True)
class CKDSettings(LearnedTriggerSettings):
    """CKD's settings (adaptive-ckd builds the same trigger and extends them)."""

    toxic_fraction: float = setting(0.1, "fraction of channels per layer treated as toxic "
                                         "(rho)", above=0.0, maximum=1.0)


def build_ckd_trigger(ctx: AttackContext, kind: str = "ckd") -> Trigger:
    """Pick toxic channels on the clean teacher and optimise the trigger that drives them."""
    if ctx.model is None:
        raise ConfigError(f"{kind} optimises its trigger on a clean teacher: use --teacher "
                          "RUN_DIR, or --model NAME with --trigger-teacher RUN_DIR")
    s: CKDSettings = ctx.settings
    splits, model, device = ctx.splits, ctx.model, ctx.device
    names = feature_names(model, s.feature_layers)
    images = trigger_images(splits.train, s.trigger_images, s.trigger_seed)
    means = mean_features(model, images, names, splits.mean, splits.std, device=device)
    fraction = s.toxic_fraction
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

    return optimise_trigger(
        model, images, names, loss, mask_max=s.mask_max, mean=splits.mean, std=splits.std,
        device=device, epochs=s.trigger_epochs, lr=s.trigger_lr, seed=s.trigger_seed, kind=kind,
        params={"toxic_fraction": fraction, "layers": names,
                "toxic_channels": {n: toxic[n].tolist() for n in names},
                "target_values": values},
        progress=ctx.progress)


register_attack(AttackSpec("ckd", build_ckd_trigger, CKDSettings, needs_model=True,
                           description="learned trigger on the teacher's strongest channels "
                                       "(CKD, survives feature distillation)"))
