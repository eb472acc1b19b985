"""LBA (latent backdoor, Yao et al. 2019): a learned trigger whose triggered non-target
images produce the features of clean target-class images at the distillation layers."""

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


@dataclass(frozen=True)
class LBASettings(LearnedTriggerSettings):
    mask_max: float = setting(0.5, "upper bound of the trigger mask", above=0.0, maximum=1.0)


def _build(ctx: AttackContext) -> Trigger:
    if ctx.model is None:
        raise ConfigError("LBA optimises its trigger on a clean teacher: use --teacher RUN_DIR, "
                          "or --model NAME with --trigger-teacher RUN_DIR")
    s: LBASettings = ctx.settings
    splits, model, device, target = ctx.splits, ctx.model, ctx.device, ctx.target
    names = feature_names(model, s.feature_layers)
    count, seed = s.trigger_images, s.trigger_seed
    target_set = splits.train.subset(torch.nonzero(splits.train.labels == target).flatten())
    goal = mean_features(model, target_set, names, splits.mean, splits.std, device=device)
    images = trigger_images(splits.train, count, seed, exclude_class=target)

    def loss(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum over layers of MSE(F_l(x'), mean target-class F_l)."""
        return sum(((feats[n].float() - goal[n]) ** 2).mean() for n in names)

    return optimise_trigger(
        model, images, names, loss, mask_max=s.mask_max, mean=splits.mean, std=splits.std,
        device=device, epochs=s.trigger_epochs, lr=s.trigger_lr, seed=seed, kind="lba",
        params={"layers": names, "target": target}, progress=ctx.progress)


register_attack(AttackSpec("lba", _build, LBASettings, needs_model=True,
                           description="learned trigger mimicking target-class "
                                       "features (latent backdoor)"))
