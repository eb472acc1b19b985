"""Feature-collision poisoning: an attacker who knows the default defence re-trains the head.

FST (the default preset's teacher cleaning) re-initialises the teacher's classifier, pushes
the new one away from the old one and tunes the copy on clean data, so a backdoor that only
the old classifier reads is lost, and the features an FKD student matches move with it.
This attacker poisons with a poison-label base attack (Blended, BadNets) and adds a loss
that pulls each poisoned image's pooled feature at the deepest distillation layer onto the
mean feature of the batch's clean target-class images (held fixed in that step): the trigger
then makes an image *look like* the target class in the features themselves, so any
classifier trained on clean data, a fresh FST head included, reads it as the target, and
the tuning has to move the target class's own features to undo it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from robustkd.attacks import badnets, blended  # noqa: F401  (the base attacks)
from robustkd.attacks.registry import AttackContext, AttackSpec, register_variant
from robustkd.data.dataset import ImageDataset
from robustkd.models.layers import layers_of
from robustkd.settings import setting
from robustkd.training.classifier import ExtraLoss

SUFFIX = "-collision"


def collision_loss(features: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor,
                   target: int) -> torch.Tensor:
    """Mean over the batch's poisoned rows of the squared distance (per channel) between
    their spatially pooled feature and the mean pooled feature of the batch's clean rows
    of class ``target`` (no gradient through that mean); zero without either kind. Masks,
    not branches: no host sync in the training step."""
    pooled = features.float().flatten(2).mean(2) if features.dim() > 2 else features.float()
    poison = is_poison.to(pooled.dtype).unsqueeze(1)
    anchors = ((labels == target) & ~is_poison).to(pooled.dtype).unsqueeze(1)
    n_anchors = anchors.sum()
    anchor = ((pooled * anchors).sum(0) / n_anchors.clamp_min(1)).detach()
    squared = ((pooled - anchor) ** 2 * poison).sum()
    return squared / (poison.sum() * pooled.shape[1]).clamp_min(1) * (n_anchors > 0)


def with_collision(base_name: str) -> AttackSpec:
    """Register ``<base_name>-collision``: the base attack's trigger and poisoned data,
    trained with the collision loss at the model's deepest distillation layer."""

    def extra(ctx: AttackContext, model: nn.Module, train: ImageDataset) -> ExtraLoss:
        layer = layers_of(model)[-1].prerelu
        weight, target = ctx.settings.weight, ctx.target
        is_poison = train.is_poison.clone()

        def fn(feats: Mapping[str, torch.Tensor], _logits: torch.Tensor, y: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
            poison = is_poison[idx.cpu()].to(y.device)
            return weight * collision_loss(feats[layer], y, poison, target)

        return ExtraLoss(fn, layers=[layer], name="collision_loss")

    return register_variant(
        base_name, SUFFIX, setting_name="weight", setting_type=float,
        field=setting(1.0, "weight of the loss pulling poisoned images' deepest features onto "
                           "the target class's clean mean", minimum=0.0),
        record="collision_weight", module=__name__, extra_loss=extra,
        description=f"{base_name} with its poisoned images' deepest features pulled onto the "
                    "target class's (an attacker who knows FST re-trains the head)")


COLLISION_ATTACKS = tuple(with_collision(b) for b in ("blended", "badnets"))
