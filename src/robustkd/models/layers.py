"""Where a model is distilled and how a teacher is held still: shared by distillation,
attacks that optimise triggers on a model, and teacher defences."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
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


@torch.no_grad()
def mix_back(model: nn.Module, original: nn.Module, keep: float,
             skip: Sequence[str] = ()) -> list[str]:
    """Move ``model``'s floating-point weights and buffers (BN statistics) to ``keep *
    original + (1 - keep) * model``, in place, except under the module names in ``skip``:
    a weight-space average of a tuned copy with the model it was tuned from (WiSE-FT's
    interpolation), which keeps more of the original's generalisation. Returns the names
    mixed. The two models must share an architecture (same state-dict keys and shapes)."""
    if not 0.0 <= keep <= 1.0:
        raise ConfigError(f"keep must be in [0, 1], got {keep}")
    ours, theirs = model.state_dict(), original.state_dict()
    if ours.keys() != theirs.keys():
        raise ConfigError("mix_back needs two models of one architecture; their state-dict "
                          "keys differ")
    mixed = []
    for key, value in ours.items():
        if not value.is_floating_point() or any(key.startswith(f"{n}.") for n in skip):
            continue
        other = theirs[key]
        if other.shape != value.shape:
            raise ConfigError(f"mix_back: {key} is {tuple(value.shape)} in the copy but "
                              f"{tuple(other.shape)} in the original")
        value.lerp_(other.to(device=value.device, dtype=value.dtype), keep)
        mixed.append(key)
    return mixed


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BN layer's running statistics as the plain average over ``batches``
    (train-mode passes, weights untouched): a weight-space average of two networks changes
    the activations' statistics non-linearly, so averaged running statistics do not describe
    the averaged network (REPAIR, Jordan et al. 2023). Returns the number of BN layers reset."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs equally
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ConfigError("reestimate_bn needs at least one batch")
    return len(bns)


@contextmanager
def held_still(modules: Sequence[nn.Module]):
    """Gradients off in ``modules`` and their BN running statistics unchanged (momentum 0,
    the batch count restored), whatever mode they run in; all restored on exit."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    grads = [(p, p.requires_grad) for p in params]
    bns = list({id(b): b for m in modules for b in m.modules()
                if isinstance(b, nn.modules.batchnorm._BatchNorm)}.values())
    momenta = [m.momentum for m in bns]
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
               for m in bns]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, momentum, count in zip(bns, momenta, tracked, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


@contextmanager
def frozen_teacher(teacher: nn.Module, mode: str):
    """Teacher in ``mode`` with gradients off; in train mode BN uses batch statistics but its
    running statistics are left untouched (momentum 0), so the teacher is not altered."""
    if mode not in ("train", "eval"):
        raise ConfigError(f"teacher BN mode must be 'train' or 'eval', got {mode!r}")
    was_training = teacher.training
    try:
        with held_still([teacher]):
            teacher.train(mode == "train")
            yield teacher
    finally:
        teacher.train(was_training)


@torch.no_grad()
def modules_through(model: nn.Module, name: str, probe: torch.Tensor) -> list[str]:
    """Names of the modules holding their own weights or buffers that a forward pass on
    ``probe`` runs before module ``name`` returns (``name`` included), in call order: what
    computes that layer's output. Found by running the model, not from the code's order."""
    target = resolve_modules(model, [name])[name]
    order: list[str] = []
    reached = False

    def record(module_name: str, module: nn.Module):
        def hook(*_):
            nonlocal reached
            if not reached and module_name not in order:
                order.append(module_name)
            reached = reached or module is target
        return hook

    owners = [(n, m) for n, m in model.named_modules()
              if m is target or next(m.parameters(recurse=False), None) is not None
              or next(m.buffers(recurse=False), None) is not None]
    handles = [m.register_forward_hook(record(n, m)) for n, m in owners]
    was_training = model.training
    try:
        model.eval()
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not reached:
        raise ConfigError(f"module {name!r} did not run in {type(model).__name__}'s forward pass")
    return order


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier: its last ``nn.Linear`` (name and module), the layer every
    built-in model ends with and the usual head of a downloaded one."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]
