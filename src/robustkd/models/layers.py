"""Where a model is distilled and how a teacher is held still: shared by distillation,
attacks that optimise triggers on a model, and teacher defences."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.taps import resolve_modules


def layers_of(model: nn.Module, names: Sequence[str] | None = None) -> list[DistillLayer]:
    """Distillation layers of a model: the given module names, else the model's declaration.

    A user-named module is its own stage and pre-ReLU point; if it is a BatchNorm its affine
    parameters give FKD's margins, otherwise margins are estimated on clean data.
    """
    if names:
        modules = resolve_modules(model, names)
        return [DistillLayer(stage=n, prerelu=n,
                             bn=n if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
                for n, m in modules.items()]
    if hasattr(model, "distill_layers"):
        return list(model.distill_layers())
    raise ConfigError(f"{type(model).__name__} does not declare distillation layers; name them "
                      "(API: teacher_layers=[...], CLI: --teacher-layers a,b,c)")


@contextmanager
def frozen_teacher(teacher: nn.Module, mode: str):
    """Teacher in ``mode`` with gradients off; in train mode BN uses batch statistics but its
    running statistics are left untouched (momentum 0), so the teacher is not altered."""
    if mode not in ("train", "eval"):
        raise ConfigError(f"teacher BN mode must be 'train' or 'eval', got {mode!r}")
    was_training = teacher.training
    grads = [(p, p.requires_grad) for p in teacher.parameters()]
    bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
               for m in bns]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        teacher.train(mode == "train")
        for m in bns:
            m.momentum = 0.0
        yield teacher
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, momentum, count in zip(bns, momenta, tracked, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
        teacher.train(was_training)


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier: its last ``nn.Linear`` (name and module), the layer every
    built-in model ends with and the usual head of a downloaded one."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]
