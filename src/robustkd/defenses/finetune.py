"""Fine-tuning baseline (METHOD.md 5.7): fine-tune a copy of the suspect teacher on the
defender's clean subset, then distil from the copy.

The oldest backdoor-removal baseline: clean-label gradient steps move the weights away
from the poisoned optimum, and backdoor neurons that clean data never activates decay
under weight decay. Defaults are deliberately gentle (SGD, lr 0.01, 10 epochs) so clean
accuracy survives; how much of the backdoor survives too is what the baseline measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.data.subsets import per_class_subset
from robustkd.defenses.registry import DefenseContext, register_teacher_defense, trainable_copy
from robustkd.distill.losses import soft_target_loss
from robustkd.errors import ConfigError
from robustkd.models.layers import layers_of, modules_through
from robustkd.settings import setting
from robustkd.training.classifier import ExtraLoss, classification_step
from robustkd.training.loop import EpochResult, fit
from robustkd.training.optim import OptimConfig


@dataclass(frozen=True)
class FinetuneSettings:
    """Plain SGD fine-tuning on the clean subset."""

    epochs: int = setting(10, "fine-tuning epochs", minimum=0)
    lr: float = setting(0.01, "SGD learning rate", above=0.0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0.0, maximum=1.0)
    weight_decay: float = setting(5e-4, "weight decay", minimum=0.0)
    schedule: str = setting("constant", "learning-rate schedule",
                            choices=("step", "cosine", "constant"))
    batch_size: int = setting(64, "batch size", minimum=1)
    anchor_weight: float = setting(0.0, "weight of the original teacher's soft targets (KD's "
                                        "term at T 4) while fine-tuning; 0: plain fine-tuning",
                                   minimum=0.0)
    data_fraction: float = setting(1.0, "share of each class of the defender's images the "
                                        "fine-tuning uses (the student still distils on all)",
                                   above=0.0, maximum=1.0)


TUNE_CHOICES = ("all", "deepest")


def held_modules(model: nn.Module, ctx: DefenseContext, tune: str
                 ) -> list[tuple[str, nn.Module]]:
    """The modules a tuning leaves as they are: none for ``all``; for ``deepest`` every module
    that computes the last-but-one distillation layer (found by running a clean batch), so
    only the deepest distillation layer's features can move — the layer through which
    backdoors cross FKD (docs/RESULTS.md)."""
    if tune == "all":
        return []
    layers = layers_of(model, ctx.layers)
    if len(layers) < 2:
        raise ConfigError(f"tune=deepest needs at least two distillation layers; "
                          f"{type(model).__name__} has {len(layers)}")
    probe = next(iter(ctx.loader(2)))[0]
    names = modules_through(model, layers[-2].prerelu, probe)
    table = dict(model.named_modules())
    return [(n, table[n]) for n in names]


def anchored_step(model: nn.Module, anchor: nn.Module, weight: float):
    """Cross-entropy plus ``weight`` times KD's soft-target term towards ``anchor``'s logits on
    the same batch: the copy may move its weights, but its clean predictions stay near the
    original's (what keeps a tuned teacher's accuracy)."""

    def step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        logits = model(x)
        with torch.no_grad():
            target = anchor(x)
        kd = soft_target_loss(logits, target)
        return F.cross_entropy(logits, y) + weight * kd, {
            "train_acc": (logits.argmax(1) == y).sum(),
            "anchor_loss": kd.detach() * x.shape[0]}

    return step


def finetune_model(model: nn.Module, ctx: DefenseContext, *, epochs: int,
                   optim: OptimConfig, batch_size: int, desc: str = "fine-tune teacher",
                   after_step: Callable[[nn.Module], None] | None = None,
                   extra_loss: ExtraLoss | None = None,
                   anchor: tuple[nn.Module, float] | None = None) -> list[EpochResult]:
    """Cross-entropy fine-tuning of ``model`` itself on ``ctx.clean`` (BN in train mode, as
    ordinary fine-tuning). ``after_step`` is called with the model after every optimiser step
    (e.g. to hold pruned channels at zero); ``extra_loss`` is added to the cross-entropy;
    ``anchor`` ``(frozen model, weight)`` adds :func:`anchored_step`'s soft-target term."""
    if epochs < 0:
        raise ConfigError(f"fine-tuning epochs must be >= 0, got {epochs}")
    if anchor is not None and extra_loss is not None:
        raise ConfigError("fine-tuning takes an extra loss or an anchor, not both")
    hook = None if after_step is None else (lambda: after_step(model))
    step = classification_step(model, extra_loss) if anchor is None else \
        anchored_step(model, anchor[0].eval(), anchor[1])
    history = fit(model.parameters(), step,
                  ctx.loader(batch_size), epochs, optim, train_modules=[model],
                  device=ctx.device, amp=ctx.amp, progress=ctx.progress, desc=desc,
                  after_step=hook)
    model.eval()
    return history


def finetune_copy(teacher: nn.Module, ctx: DefenseContext, *, epochs: int,
                  optim: OptimConfig, batch_size: int, desc: str = "fine-tune teacher",
                  after_step: Callable[[nn.Module], None] | None = None,
                  anchor_weight: float = 0.0) -> tuple[nn.Module, list[EpochResult]]:
    """:func:`finetune_model` on a *copy* of ``teacher``; the original is left unchanged
    (and, with ``anchor_weight``, is the anchor whose soft targets the copy keeps near)."""
    model = trainable_copy(teacher)
    anchor = (teacher, anchor_weight) if anchor_weight > 0 else None
    history = finetune_model(model, ctx, epochs=epochs, optim=optim, batch_size=batch_size,
                             desc=desc, after_step=after_step, anchor=anchor)
    return model, history


def tuning_share(ctx: DefenseContext, fraction: float) -> DefenseContext:
    """The context a tuning on ``fraction`` of each class of the defender's images reads (the
    same images for a seed); the student still distils on all of them."""
    if fraction >= 1.0:
        return ctx
    return replace(ctx, clean=per_class_subset(ctx.clean, fraction, seed=ctx.seed))


def finetune_optim(cfg: Any, *, nesterov: bool = True) -> OptimConfig:
    """The SGD optimiser of a tuning with settings ``cfg`` (any settings with ``lr``,
    ``momentum``, ``weight_decay`` and ``schedule``: fine-tuning's, FST's)."""
    return OptimConfig(name="sgd", lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, nesterov=nesterov,
                       schedule=cfg.schedule)


@register_teacher_defense("finetune", FinetuneSettings,
                          help="fine-tune a copy of the teacher on the clean subset")
def finetune_defense(teacher: nn.Module, ctx: DefenseContext,
                     cfg: FinetuneSettings) -> tuple[nn.Module, dict]:
    """The fine-tuned copy, with the fine-tuning history for the record."""
    optim = finetune_optim(cfg)
    ctx = tuning_share(ctx, cfg.data_fraction)
    model, history = finetune_copy(teacher, ctx, epochs=cfg.epochs, optim=optim,
                                   batch_size=cfg.batch_size, anchor_weight=cfg.anchor_weight)
    return model, {"history": [h.as_dict() for h in history], "images": len(ctx.clean)}
