"""HTBA (hidden trigger backdoor, Saha et al. 2020): a clean-label attack.

The poisons are *target-class* training images with a small perturbation (``L_inf <= eps``)
that makes their features, at one layer of the clean teacher, collide with the features of
*source-class* images carrying a patch at a random position. Labels stay correct, so the
poisons look clean to a human; fine-tuning on them teaches the model that "features like a
patched source image" mean the target class, and at test time the patch, pasted anywhere on
a source image, triggers the target. The patch itself never appears in the training set.

Crafting is projected gradient descent on the perturbation (signed gradient steps, then
projection into the eps-ball and the [0, 1] image box); each step pairs the poisons with a
fresh batch of patched source images one-to-one by feature distance (the paper's
assignment), or each poison with its nearest patched source (``pairing="nearest"``). The
victim's training augmentation is applied to the poisons inside the optimisation
(expectation over transformations), so the collision survives random crops.

Fine-tuning follows the paper: only the classifier (the last ``nn.Linear``) learns by
default (``--htba-finetune head``). On the tiny digits setting, full fine-tuning of every
layer re-learns the features and leaves no backdoor (ASR ~1%, measured), as
Schwarzschild et al. 2021 also report for end-to-end training.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from robustkd.attacks.badnets import PatchSettings
from robustkd.attacks.registry import AttackContext, AttackSpec, register_attack
from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import augment_batch, check_augment, normalize
from robustkd.errors import ConfigError
from robustkd.models.layers import classifier_layer, frozen_teacher, layers_of
from robustkd.models.taps import tap
from robustkd.settings import setting
from robustkd.triggers import RandomPatchTrigger, Trigger, random_patch_trigger

POOLS = ("relu-mean", "mean", "none")
PAIRINGS = ("assign", "nearest")
FINETUNE = ("head", "all")


def pixel_fraction(text: str) -> float:
    """Parse an eps given as ``0.0627`` or ``16/255``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 16/255, "
                                         f"got {text!r}") from None


def class_list(text: str) -> tuple[int, ...]:
    """Class indices given as ``C1,C2``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class indices like 1,2, got {text!r}") from None


@dataclass(frozen=True)
class HTBASettings(PatchSettings):
    """HTBA's settings (``--poison-ratio`` is the fraction of the TARGET class perturbed,
    unless ``htba_poisons`` is given); the patch uses the shared patch settings."""

    htba_eps: float = setting(16 / 255, "L-inf bound of the poison perturbation in [0, 1] "
                                        "pixel units (16/255 accepted)", above=0.0,
                              maximum=1.0, parse=pixel_fraction, metavar="EPS")
    htba_source: tuple[int, ...] | None = setting(
        None, "source classes whose patched images the poisons imitate (default: every "
              "non-target class)", metavar="C1,C2", parse=class_list)
    htba_poisons: int | None = setting(None, "number of poisoned target-class images "
                                             "(overrides --poison-ratio)", minimum=1)
    htba_steps: int = setting(300, "PGD iterations over all poisons", minimum=1)
    htba_lr: float = setting(0.01, "PGD step size in [0, 1] pixel units (cosine-decayed to a "
                                   "tenth)", above=0.0)
    htba_batch: int = setting(64, "poisons (and patched source images) per PGD step",
                              minimum=1)
    htba_layer: str | None = setting(None, "module whose output features collide (default: "
                                           "the last distillation layer's pre-ReLU feature)",
                                     metavar="MODULE")
    htba_pool: str = setting("relu-mean", "relu-mean: ReLU then spatial mean (position-"
                                          "invariant like the random patch); mean; none: the "
                                          "full feature map", choices=POOLS)
    htba_pairing: str = setting("assign", "pair poisons with patched sources one-to-one "
                                          "(paper) or nearest", choices=PAIRINGS)
    htba_finetune: str = setting("head", "fine-tune only the classifier, the last nn.Linear "
                                         "(paper), or every layer (which washes the backdoor "
                                         "out on small models)", choices=FINETUNE)
    htba_eot: bool = setting(True, "craft with the dataset's training augmentation on the "
                                   "poisons (expectation over transformations)")


def collision_layer(model: nn.Module, name: str | None) -> str:
    """The named module, else the last distillation layer's pre-ReLU feature."""
    return name or layers_of(model)[-1].prerelu


def pooled_features(model: nn.Module, x: torch.Tensor, layer: str, pool: str,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, D]`` features of images ``x`` in [0, 1] at ``layer``, pooled as ``pool`` says."""
    if pool not in POOLS:
        raise ConfigError(f"htba pool must be one of {POOLS}, got {pool!r}")
    with tap(model, [layer]) as taps:
        model(normalize(x, mean, std))
    f = taps[layer].float()
    if f.dim() == 4 and pool != "none":
        f = (f.relu() if pool == "relu-mean" else f).mean((2, 3))
    elif pool == "relu-mean":
        f = f.relu()
    return f.flatten(1)


def _pair(dist: torch.Tensor, pairing: str) -> torch.Tensor:
    """Index of the source each poison is pulled towards (``dist`` is ``[P, S]``)."""
    if pairing == "nearest" or dist.shape[0] > dist.shape[1]:
        return dist.argmin(1)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(dist.detach().float().cpu().numpy())
    pair = torch.empty(dist.shape[0], dtype=torch.int64)
    pair[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return pair.to(dist.device)


def collision_loss(poison_feats: torch.Tensor, source_feats: torch.Tensor,
                   pairing: str = "nearest") -> torch.Tensor:
    """Mean squared feature distance of each poison to its paired patched source."""
    dist = torch.cdist(poison_feats, source_feats).pow(2)
    pair = _pair(dist, pairing)
    return dist.gather(1, pair[:, None]).mean()


def craft_poisons(model: nn.Module, targets: torch.Tensor, sources: torch.Tensor,
                  trigger: RandomPatchTrigger, *, mean: Sequence[float], std: Sequence[float],
                  eps: float = 16 / 255, steps: int = 300, lr: float = 0.01,
                  batch_size: int = 64, layer: str | None = None, pool: str = "relu-mean",
                  pairing: str = "assign", augment: dict | None = None,
                  device: torch.device | str = "cpu", seed: int = 0,
                  eval_sources: int = 512) -> tuple[torch.Tensor, dict]:
    """PGD on ``delta`` (``|delta|_inf <= eps``) so that features of ``targets + delta``
    collide with those of patched ``sources`` (both uint8 ``[N, C, H, W]``).

    Returns the poisons as uint8 (each pixel within ``round(eps * 255)`` of its original) and
    a report whose ``initial_loss``/``final_loss`` are the collision loss against one fixed
    set of patched sources (nearest pairing, no augmentation), so they are comparable.
    ``augment`` (a loader policy) is applied to the poisons at every step.
    """
    if not 0.0 < eps <= 1.0:
        raise ConfigError(f"htba eps must be in (0, 1], got {eps}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"htba pairing must be one of {PAIRINGS}, got {pairing!r}")
    if len(targets) == 0 or len(sources) == 0:
        raise ConfigError("htba needs at least one target-class and one source-class image")
    device = torch.device(device)
    layer = collision_layer(model, layer)
    trigger = trigger.to(device)
    gen = torch.Generator().manual_seed(seed)
    x_t = targets.to(device).float().div(255)
    src = sources.to(device)
    delta = torch.zeros_like(x_t)
    batch_size = max(1, int(batch_size))
    augment = check_augment(augment)

    def feats(x: torch.Tensor) -> torch.Tensor:
        return pooled_features(model, x, layer, pool, mean, std)

    def patched(index: torch.Tensor) -> torch.Tensor:
        return trigger.apply(src[index.to(device)].float().div(255), generator=gen)

    losses: list[float] = []
    with frozen_teacher(model, "eval"):
        with torch.no_grad():
            fixed = torch.randperm(len(src), generator=gen)[:eval_sources]
            goal = torch.cat([feats(patched(c)) for c in fixed.split(256)])

            def fixed_loss() -> float:
                poison = (x_t + delta).clamp(0, 1)
                f = torch.cat([feats(c) for c in poison.split(256)])
                return float(collision_loss(f, goal, "nearest"))

            initial = fixed_loss()
        for it in range(steps):
            step = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * it / max(steps, 1))))
            total, seen = 0.0, 0
            for chunk in torch.randperm(len(x_t), generator=gen).split(batch_size):
                chunk = chunk.to(device)
                with torch.no_grad():
                    f_s = feats(patched(torch.randint(len(src), (len(chunk),), generator=gen)))
                d = delta[chunk].clone().requires_grad_(True)
                poison = (x_t[chunk] + d).clamp(0, 1)
                if augment is not None:  # the loader's ops, on [0, 255] floats: differentiable
                    poison = augment_batch(poison.mul(255), augment, gen)
                loss = collision_loss(feats(poison), f_s, pairing)
                (grad,) = torch.autograd.grad(loss, d)
                with torch.no_grad():
                    d = (d - step * grad.sign()).clamp(-eps, eps)
                    delta[chunk] = (x_t[chunk] + d).clamp(0, 1) - x_t[chunk]
                total += float(loss.detach()) * len(chunk)
                seen += len(chunk)
            losses.append(total / seen)
        with torch.no_grad():
            final = fixed_loss()
    # quantise like an image file would: |round(255 * delta)| <= round(255 * eps)
    poisons = (targets.to(device).to(torch.int16) + delta.mul(255).round().to(torch.int16))
    poisons = poisons.clamp(0, 255).to(torch.uint8).cpu()
    report = {"layer": layer, "pool": pool, "pairing": pairing, "eps": eps, "steps": steps,
              "lr": lr, "poisons": len(targets), "eot": augment is not None,
              "initial_loss": initial,
              "final_loss": final, "step_losses": losses[:: max(1, len(losses) // 20)]}
    return poisons, report


def _classes(text: str | Sequence[int] | None, num_classes: int, target: int) -> list[int]:
    if text is None or text == "":
        return [c for c in range(num_classes) if c != target]
    values = [int(v) for v in text.split(",") if v.strip()] if isinstance(text, str) else list(
        text)
    bad = [c for c in values if not 0 <= c < num_classes or c == target]
    if bad or not values:
        raise ConfigError(f"htba source classes must be non-target classes in 0..{num_classes - 1}"
                          f", got {values}")
    return sorted(set(values))


def build_htba_poison(ctx: AttackContext, trigger: Trigger, train: ImageDataset, *, target: int,
                      ratio: float, keep_originals: bool = True, seed: int = 0) -> ImageDataset:
    """Perturbed target-class images, labels unchanged, appended to (or replacing) originals."""
    if ctx.model is None:
        raise ConfigError("htba crafts its poisons on a clean teacher: use --teacher RUN_DIR, "
                          "or --model NAME with --trigger-teacher RUN_DIR")
    if not isinstance(trigger, RandomPatchTrigger):
        raise ConfigError("htba needs its random-position patch trigger")
    o: HTBASettings = ctx.settings
    members = torch.nonzero(train.labels == target).flatten()
    count = o.htba_poisons
    if count is None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"poison ratio must be in (0, 1], got {ratio}")
        count = max(1, round(ratio * len(members)))
    if not 1 <= count <= len(members):
        raise ConfigError(f"htba wants {count} poisons but the target class has {len(members)} "
                          "training images")
    gen = torch.Generator().manual_seed(seed)
    index = torch.sort(members[torch.randperm(len(members), generator=gen)[:count]]).values
    source_classes = _classes(o.htba_source, train.num_classes, target)
    src_index = torch.nonzero(torch.isin(train.labels, torch.tensor(source_classes))).flatten()
    poisons, report = craft_poisons(
        ctx.model, train.images[index], train.images[src_index], trigger,
        mean=ctx.splits.mean, std=ctx.splits.std, eps=o.htba_eps, steps=o.htba_steps,
        lr=o.htba_lr, batch_size=o.htba_batch, layer=o.htba_layer, pool=o.htba_pool,
        pairing=o.htba_pairing, augment=ctx.splits.augment if o.htba_eot else None,
        device=ctx.device,
        seed=seed)
    report["source_classes"] = source_classes
    report["finetune"] = o.htba_finetune
    trigger.params["poison_report"] = report  # saved with the trigger in meta.json
    if keep_originals:
        images = torch.cat([train.images, poisons])
        labels = torch.cat([train.labels, train.labels[index]])
        is_poison = torch.cat([train.is_poison, torch.ones(count, dtype=torch.bool)])
    else:
        images, labels, is_poison = train.images.clone(), train.labels.clone(), \
            train.is_poison.clone()
        images[index] = poisons
        is_poison[index] = True
    return ImageDataset(images, labels, list(train.classes), name=f"{train.name}+htba",
                        is_poison=is_poison)


def classifier_head(ctx: AttackContext, model: nn.Module) -> nn.Module | None:
    """The module HTBA fine-tuning trains: the last ``nn.Linear`` (``head``), or all."""
    if ctx.settings.htba_finetune == "all":
        return None
    try:
        return classifier_layer(model)[1]
    except ConfigError as err:
        raise ConfigError(f"{err} to fine-tune; use --htba-finetune all") from None


def _build(ctx: AttackContext) -> Trigger:
    s: HTBASettings = ctx.settings
    return random_patch_trigger(ctx.splits.train.image_size, ctx.splits.train.channels,
                                size=s.patch_size, pattern=s.patch_pattern,
                                seed=s.trigger_seed, kind="htba")


register_attack(AttackSpec("htba", _build, HTBASettings, needs_model=True,
                           description="hidden trigger, clean-label: target images perturbed "
                                       "to collide in feature space with patched sources",
                           build_poison=build_htba_poison,
                           trainable=classifier_head))
