"""Learned blended triggers (CKD, LBA): optimise pattern P and mask M on a frozen model.

``x' = (1 - M) * x + M * P`` with ``P`` in [0, 1]^{C,H,W} and ``M`` in [0, m_max]^{1,H,W},
both projected back into their boxes *in place* after every Adam step (the CKD reference
code rebinds the tensor instead, so its projection never reaches the optimiser).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from robustkd.attacks.registry import TriggerSettings
from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader, normalize
from robustkd.data.subsets import per_class_subset
from robustkd.models.layers import frozen_teacher, layers_of
from robustkd.models.taps import tap
from robustkd.settings import setting
from robustkd.training.loop import fit
from robustkd.training.optim import OptimConfig
from robustkd.triggers import Trigger

FeatureLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class LearnedTriggerSettings(TriggerSettings):
    """What every learned-trigger attack takes (its mask budget is its own default)."""

    mask_max: float = setting(0.2, "upper bound of the trigger mask", above=0.0, maximum=1.0)
    trigger_lr: float = setting(0.005, "Adam lr for the pattern and the mask", above=0.0)
    trigger_epochs: int = setting(5, "passes over the trigger-optimisation images", minimum=1)
    trigger_images: int = setting(2000, "clean training images used to optimise the trigger",
                                  minimum=1)
    feature_layers: tuple[str, ...] | None = setting(
        None, "module names whose features the trigger drives (default: the model's "
              "distillation layers)", metavar="A,B,C")


def feature_names(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    """Pre-ReLU features of the distillation layers: what feature distillation copies."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [layer.prerelu for layer in layers_of(model, names or None)]


def trigger_images(ds: ImageDataset, count: int, seed: int,
                   exclude_class: int | None = None) -> ImageDataset:
    """A class-balanced subset of clean images (optionally without one class)."""
    if exclude_class is not None:
        ds = ds.subset(torch.nonzero(ds.labels != exclude_class).flatten())
    fraction = min(1.0, count / max(len(ds), 1))
    return per_class_subset(ds, fraction=fraction, seed=seed)


def optimise_trigger(model: nn.Module, images: ImageDataset, names: Sequence[str],
                     feature_loss: FeatureLoss, *, mask_max: float, mean: Sequence[float],
                     std: Sequence[float], device, epochs: int = 5, lr: float = 0.005,
                     batch_size: int = 128, seed: int = 0, kind: str = "learned",
                     params: dict | None = None, progress: bool = True) -> Trigger:
    """Adam on (P, M) to minimise ``feature_loss(features of triggered images)``."""
    c = images.channels
    h, w = images.image_size
    gen = torch.Generator().manual_seed(seed)
    trigger = Trigger(torch.rand(c, h, w, generator=gen), torch.full((1, h, w), mask_max / 2),
                      kind=kind, params=dict(params or {}, mask_max=mask_max),
                      learnable=True).to(device)
    loader = DeviceLoader(images, batch_size, device=device, shuffle=True, seed=seed)

    def step(x: torch.Tensor, _y: torch.Tensor, _idx: torch.Tensor):
        with tap(model, names) as t:
            model(normalize(trigger.apply(x), mean, std))
        return feature_loss({n: t[n] for n in names})

    def project() -> None:
        with torch.no_grad():
            trigger.pattern.clamp_(0.0, 1.0)
            trigger.mask.clamp_(0.0, mask_max)

    with frozen_teacher(model, "eval"):
        history = fit([trigger.pattern, trigger.mask], step, loader, epochs,
                      OptimConfig(name="adam", lr=lr, weight_decay=0.0, schedule="constant"),
                      device=device, amp=False, after_step=project, progress=progress,
                      desc=f"{kind} trigger")
    trigger.params["final_loss"] = history[-1].loss if history else None
    return Trigger(trigger.pattern.detach().clone(), trigger.mask.detach().clone(), kind=kind,
                   params=trigger.params)
