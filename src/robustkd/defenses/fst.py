"""Feature Shift Tuning (FST; Min et al., NeurIPS 2023): fine-tuning that forces the
features to move, so a backdoor entangled with clean features does not survive it.

Plain fine-tuning on a little clean data barely moves a backdoored feature extractor: the
old classifier still reads the old features, so the loss is low from the first step. FST
re-initialises the classifier and penalises its alignment with the original one
(``alpha * <W, W_orig>``), keeping ``||W||`` at its original norm after every step; the
only way to lower the loss is then for the features themselves to shift. That matters for
distillation: a teacher whose predictions are clean but whose features still respond to the
trigger hands the backdoor to a student that matches those features (docs/RESULTS.md).
Defaults are the reference code's (SGD momentum 0.9 without weight decay, lr 0.01, cosine
over 10 epochs, batch 128, alpha 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from robustkd.defenses.finetune import (
    TUNE_CHOICES,
    finetune_model,
    finetune_optim,
    held_modules,
    tuning_share,
)
from robustkd.defenses.registry import DefenseContext, register_teacher_defense, trainable_copy
from robustkd.models.layers import classifier_layer, held_still, mix_back, reestimate_bn
from robustkd.settings import setting
from robustkd.training.classifier import ExtraLoss
from robustkd.training.loop import autocast_for


@dataclass(frozen=True)
class FSTSettings:
    """FST's tuning: the fine-tuning optimiser plus the head penalty's weight."""

    epochs: int = setting(10, "tuning epochs", minimum=0)
    lr: float = setting(0.01, "SGD learning rate", above=0.0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0.0, maximum=1.0)
    weight_decay: float = setting(0.0, "weight decay", minimum=0.0)
    schedule: str = setting("cosine", "learning-rate schedule",
                            choices=("step", "cosine", "constant"))
    batch_size: int = setting(128, "batch size", minimum=1)
    alpha: float = setting(0.2, "weight of the penalty on the new classifier's inner product "
                                "with the original one", minimum=0.0)
    tune: str = setting("all", "which weights tune: all, or only those after the last-but-one "
                               "distillation layer (deepest: the shallower distillation "
                               "features stay the original's; not in FST)",
                        choices=TUNE_CHOICES)
    original_share: float = setting(0.0, "share of the original teacher in a weight-space "
                                         "average with the tuned copy, every layer but the "
                                         "classifier (0: FST's copy; WiSE-FT's "
                                         "interpolation, not in FST)",
                                    minimum=0.0, maximum=1.0)
    data_fraction: float = setting(1.0, "share of each class of the defender's images the "
                                        "tuning uses (the student still distils on all; not "
                                        "in FST)", above=0.0, maximum=1.0)


def reinit_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, as FST re-initialises."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)


def alignment_penalty(weight: torch.Tensor, original: torch.Tensor, alpha: float
                      ) -> torch.Tensor:
    """FST's extra loss: ``alpha * sum(W * W_orig)``; minimising it turns the new classifier
    away from the features the original one read."""
    return alpha * (weight.float() * original).sum()


def keep_norm(layer: nn.Linear, norm: torch.Tensor) -> None:
    """Rescale the classifier's weight to ``norm`` (the original's Frobenius norm), so the
    penalty cannot be lowered by shrinking the weight."""
    with torch.no_grad():
        layer.weight.mul_(norm / layer.weight.norm())


@register_teacher_defense("fst", FSTSettings,
                          help="feature shift tuning: fine-tune with a re-initialised "
                               "classifier pushed away from the original one")
def fst_defense(teacher: nn.Module, ctx: DefenseContext,
                cfg: FSTSettings) -> tuple[nn.Module, Mapping]:
    """The tuned copy, with the tuning history for the record."""
    model = trainable_copy(teacher)
    name, head = classifier_layer(model)
    original = head.weight.detach().float().clone()
    norm = original.norm()
    reinit_linear(head, torch.Generator().manual_seed(ctx.seed))
    extra = ExtraLoss(lambda _f, _logits, _y, _idx: alignment_penalty(head.weight, original,
                                                                      cfg.alpha),
                      name="fst_penalty")
    held = held_modules(model, ctx, cfg.tune)
    tuning = tuning_share(ctx, cfg.data_fraction)
    with held_still([m for _, m in held]):
        history = finetune_model(model, tuning, epochs=cfg.epochs,
                                 optim=finetune_optim(cfg, nesterov=False),
                                 batch_size=cfg.batch_size, desc="feature shift tuning",
                                 after_step=lambda m: keep_norm(head, norm), extra_loss=extra)
    if cfg.original_share > 0:
        mix_back(model, teacher, cfg.original_share, skip=[name])
        with autocast_for(ctx.device, ctx.amp):
            reestimate_bn(model, (x for x, _, _ in ctx.loader(cfg.batch_size)))
    return model, {"classifier": name, "history": [h.as_dict() for h in history],
                   "held": [n for n, _ in held], "images": len(tuning.clean)}
