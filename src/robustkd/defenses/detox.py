"""RobustKD step (I): detoxification masks on a frozen teacher (METHOD.md section 5.1-5.2).

For each chosen stage ``l`` two learnable tensors of the feature's shape, shared by all
inputs: a mask ``m`` in [0, tau] and a replacement feature ``delta`` (initialised with the
clean mean feature). The stage output is replaced inside the forward pass, so later stages
compute on the detoxified feature:

* ``eq7`` (default): ``(1 - m) * F + m * delta``
* ``eq15``: ``F + m * delta``

The masks are trained with ``CE(teacher logits, y) + lambda * mean_b Var(F~_L(x_b))`` on
clean data (teacher weights frozen), clamping ``m`` into [0, tau] after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import mean_features, per_example_variance
from robustkd.models.layers import frozen_teacher
from robustkd.models.taps import tap
from robustkd.training.loop import EpochResult, fit
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig

VARIANTS = ("eq7", "eq15")
DETOX_LOSSES = ("ce+var", "ce", "var")
MASK_SHAPES = ("element", "channel")


class DetoxMasks(nn.Module):
    """Masks and replacement features for a set of named teacher modules."""

    def __init__(self, names: Sequence[str], deltas: Sequence[torch.Tensor], tau: float,
                 variant: str = "eq7", mask_init: float | None = None,
                 mask_shape: str = "element") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"mask variant must be one of {VARIANTS}, got {variant!r}")
        if mask_shape not in MASK_SHAPES:
            raise ConfigError(f"mask shape must be one of {MASK_SHAPES}, got {mask_shape!r}")
        if not tau > 0:
            raise ConfigError(f"mask threshold tau must be > 0, got {tau}")
        self.names = list(names)
        self.tau, self.variant, self.mask_shape = float(tau), variant, mask_shape
        init = min(tau / 2 if mask_init is None else float(mask_init), tau)

        def mask_like(d: torch.Tensor) -> torch.Tensor:
            # "channel": one value per channel ([C, 1, 1]), broadcast over positions
            shape = d.shape if mask_shape == "element" or d.dim() < 2 else \
                (d.shape[0],) + (1,) * (d.dim() - 1)
            return torch.full(shape, init, dtype=d.dtype, device=d.device)

        self.masks = nn.ParameterList([nn.Parameter(mask_like(d)) for d in deltas])
        self.deltas = nn.ParameterList([nn.Parameter(d.detach().clone()) for d in deltas])

    def mix(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        m = self.masks[index].to(feature.dtype)
        d = self.deltas[index].to(feature.dtype)
        if self.variant == "eq7":
            return (1 - m) * feature + m * d
        return feature + m * d

    def replacements(self) -> dict[str, Any]:
        """Forward-hook replacements for :func:`robustkd.models.taps.tap`."""
        return {name: partial(self.mix, i) for i, name in enumerate(self.names)}

    @torch.no_grad()
    def project_(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, self.tau)

    def mean_opening(self) -> torch.Tensor:
        """Mean of ``m / tau`` over every mask element: 0 closed, 1 fully open."""
        return torch.stack([m.float().mean() for m in self.masks]).mean() / self.tau

    def config(self) -> dict[str, Any]:
        return {"names": self.names, "tau": self.tau, "variant": self.variant,
                "mask_shape": self.mask_shape,
                "shapes": [list(d.shape) for d in self.deltas]}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.names):
            out[f"detox.{name}.mask"] = self.masks[i].detach()
            out[f"detox.{name}.delta"] = self.deltas[i].detach()
        return out

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DetoxMasks:
        names = config["names"]
        deltas = [tensors[f"detox.{n}.delta"] for n in names]
        masks = cls(names, deltas, config["tau"], config["variant"],
                    mask_shape=config.get("mask_shape", "element"))
        with torch.no_grad():
            for i, n in enumerate(names):
                masks.masks[i].copy_(tensors[f"detox.{n}.mask"])
        return masks


def detox_loss(logits: torch.Tensor, labels: torch.Tensor, last_feature: torch.Tensor,
               mode: str = "ce+var", lam: float = 1.0, opening: torch.Tensor | None = None,
               open_weight: float = 0.0) -> torch.Tensor:
    """``L_CE + lambda * L_var`` (Eq. 10) or one of its ablations (``ce``, ``var``).

    ``open_weight`` > 0 (not in the paper) subtracts ``open_weight * opening`` (the masks'
    mean opening ``m / tau``): masks then open wherever clean accuracy does not need the
    teacher's own feature, cutting pathways that are silent on clean data.
    """
    if mode not in DETOX_LOSSES:
        raise ConfigError(f"detox loss must be one of {DETOX_LOSSES}, got {mode!r}")
    loss = logits.new_zeros((), dtype=torch.float32)
    if "ce" in mode:
        loss = loss + F.cross_entropy(logits.float(), labels)
    if "var" in mode:
        loss = loss + lam * per_example_variance(last_feature).mean()
    if open_weight:
        if opening is None:
            raise ConfigError("open_weight needs the masks' opening")
        loss = loss - open_weight * opening
    return loss


@dataclass(frozen=True)
class DetoxSettings:
    """One detoxification: the mask threshold and equation, the loss and its variance
    weight, the Adam schedule of the masks, their initial value and shape, the teacher's BN
    mode and the (non-paper) mask-opening reward. No defaults here: they live in
    :class:`robustkd.defenses.robustkd.RobustKDConfig`, whose ``detox(tau)`` builds one."""

    tau: float
    variant: str
    loss_mode: str
    lam: float
    epochs: int
    lr: float
    mask_init: float | None
    teacher_bn: str
    mask_shape: str
    open_weight: float


def train_detox_masks(teacher: nn.Module, clean: ImageDataset, names: Sequence[str],
                      detox: DetoxSettings, loop: LoopSettings
                      ) -> tuple[DetoxMasks, list[EpochResult]]:
    """Optimise masks and replacement features on clean data; the teacher stays frozen.

    ``names`` are stage-output modules; the last one carries ``L_var``. The masks train
    in fp32 (``loop.amp`` does not apply here yet).
    """
    d, device = detox, loop.device
    if not names:
        raise ConfigError("no layers to detoxify")
    # the replacement starts as the clean mean feature (paper section 4.2.1)
    means = mean_features(teacher, clean, names, loop.mean, loop.std, device=device)
    deltas = [means[n] for n in names]
    masks = DetoxMasks(names, deltas, d.tau, d.variant, d.mask_init, d.mask_shape).to(device)
    last = names[-1]
    loader = DeviceLoader(clean, loop.batch_size, device=device, mean=loop.mean, std=loop.std,
                          shuffle=True, augment=loop.augment,
                          drop_last=len(clean) > loop.batch_size, seed=loop.seed)

    def step(x: torch.Tensor, y: torch.Tensor, _idx: torch.Tensor):
        with tap(teacher, [last], replace=masks.replacements()) as t:
            logits = teacher(x)
        opening = masks.mean_opening()
        loss = detox_loss(logits, y, t[last], d.loss_mode, d.lam, opening, d.open_weight)
        return loss, {"train_acc": (logits.argmax(1) == y).sum(),
                      "variance": per_example_variance(t[last]).detach().sum(),
                      "opening": opening.detach() * x.shape[0]}

    with frozen_teacher(teacher, d.teacher_bn):
        history = fit(masks.parameters(), step, loader, d.epochs,
                      OptimConfig(name="adam", lr=d.lr, weight_decay=0.0, schedule="constant"),
                      device=device, amp=False, after_step=masks.project_,
                      progress=loop.progress, desc=f"detox tau={d.tau}")
    return masks, history
