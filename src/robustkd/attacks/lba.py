"""LBA (latent backdoor, Yao et al. 2019): a learned trigger whose triggered non-target
images produce the features of clean target-class images at the distillation layers."""

from __future__ import annotations

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


def _build(ctx: AttackContext) -> Trigger:
    if ctx.model is None:
        raise ConfigError("LBA optimises its trigger on a clean teacher: use --teacher RUN_DIR, "
                          "or --model NAME with --trigger-teacher RUN_DIR")
    o = ctx.options
    splits, model, device = ctx.splits, ctx.model, ctx.device
    target = o["target"]
    names = feature_names(model, o.get("feature_layers"))
    count = o.get("trigger_images", 2000)
    seed = o.get("trigger_seed", 0)
    target_set = splits.train.subset(torch.nonzero(splits.train.labels == target).flatten())
    goal = mean_features(model, target_set, names, splits.mean, splits.std, device=device)
    images = trigger_images(splits.train, count, seed, exclude_class=target)

    def loss(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum over layers of MSE(F_l(x'), mean target-class F_l)."""
        return sum(((feats[n].float() - goal[n]) ** 2).mean() for n in names)

    return optimise_trigger(
        model, images, names, loss, mask_max=o.get("mask_max") or 0.5, mean=splits.mean,
        std=splits.std, device=device, epochs=o.get("trigger_epochs", 5),
        lr=o.get("trigger_lr", 0.005), seed=seed, kind="lba",
        params={"layers": names, "target": target}, progress=o.get("progress", True))


register_attack(AttackSpec("lba", _build, needs_model=True,
                           description="learned trigger mimicking target-class "
                                       "features (latent backdoor)",
                           shared_arguments=(learned_trigger_arguments,)))
