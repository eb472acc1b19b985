"""ANP baseline (Wu & Wang, NeurIPS 2021): Adversarial Neuron Pruning.

Backdoored networks are unusually sensitive to small perturbations of single neurons: nudging
the BatchNorm scales and shifts of a few channels makes them predict the target class on
clean inputs. ANP gives every BatchNorm channel k a mask m_k in [0, 1] and, on the defender's
clean data, alternates

1. an inner maximisation over multiplicative perturbations delta_k (on gamma) and xi_k (on
   beta), each in [-eps, eps]: the channel computes ``gamma_k (m_k + delta_k) x_hat + beta_k
   (1 + xi_k)``; ``steps`` sign-gradient ascent steps of size ``eps / steps`` on the CE loss
   from a uniform random start, and
2. an outer SGD step on the masks of ``alpha * CE(m) + (1 - alpha) * CE(m, delta, xi)``,
   then clipping the masks to [0, 1].

Channels whose mask ends below ``threshold`` are pruned in a fresh copy of the teacher by
zeroing their BN weight (the bias is kept), as the reference code prunes. The model weights
are frozen throughout; only masks and perturbations are optimised, with the model in train
mode (batch statistics) as in the reference ``optimize_mask_cifar.py``.

Defaults are the paper's and the reference code's: eps 0.4, 1 step, alpha 0.2, mask lr 0.2
with momentum 0.9, 2000 iterations of batch 128, threshold 0.2. Implementation notes against
the reference (csdongxian/ANP_backdoor): masks and perturbations live in forward hooks on the
BatchNorm modules instead of replacement ``NoisyBatchNorm`` layers, so any model works; the
perturbations are clipped to [-eps, eps] after each ascent step (the paper's constraint; the
reference leaves them unclipped, up to 2 eps after one step); a channel is pruned when its
mask is *strictly* below the threshold (the reference uses ``<=``, which differs only at
exact ties). ``max_acc_drop`` replaces the reference's trigger-based choice among thresholds
with a blind one: the largest threshold whose accuracy on a held-out part of the clean data
stays within ``max_acc_drop`` of the unpruned teacher's. ``finetune_epochs`` adds
Fine-Pruning's recovery step (Liu et al. 2018): the pruned copy is fine-tuned on the clean data
with the fine-tuning baseline's optimiser while its pruned channels stay at zero, so a larger
pruning need not cost the accuracy it costs at once.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.data.subsets import split_validation
from robustkd.defenses.finetune import FinetuneSettings, finetune_copy, finetune_optim
from robustkd.defenses.registry import DefenseContext, register_teacher_defense
from robustkd.errors import ConfigError, DataError
from robustkd.evaluation.metrics import accuracy
from robustkd.models.neurons import ANP_EPS, batchnorm_layers, perturbed_bn_output
from robustkd.models.taps import resolve_modules
from robustkd.settings import setting
from robustkd.training.loop import EpochResult, fit
from robustkd.training.optim import OptimConfig

# fraction of each class of the clean data held out to choose the threshold (max_acc_drop)
VAL_FRACTION = 0.1
# thresholds tried by the blind choice: 0.05, 0.10, ..., 0.90 (the reference's pruning grid)
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 19))
# the perturbed predictions' errors are counted in this many blocks of the mask batches
FLIP_BLOCKS = 10


@dataclass(frozen=True)
class ANPSettings:
    """ANP's knobs (defaults: paper and reference code)."""

    eps: float = setting(ANP_EPS, "bound of the multiplicative neuron perturbation", minimum=0.0)
    steps: int = setting(1, "ascent steps on the perturbation per batch", minimum=1)
    alpha: float = setting(0.2, "weight of the natural loss (1 - alpha: perturbed loss)",
                           minimum=0.0, maximum=1.0)
    mask_lr: float = setting(0.2, "SGD lr of the neuron masks", above=0.0)
    iterations: int = setting(2000, "mask-optimisation batches", minimum=1)
    batch_size: int = setting(128, "batch size", minimum=1)
    threshold: float = setting(0.2, "prune neurons whose mask ends below this",
                               minimum=0.0, maximum=1.0)
    max_acc_drop: float | None = setting(None, "choose the threshold blind instead: the "
                                               "largest pruning whose held-out clean accuracy "
                                               "drops by at most this fraction",
                                         minimum=0.0, maximum=1.0)
    finetune_epochs: int = setting(0, "then fine-tune the pruned copy this many epochs on the "
                                      "clean data, pruned channels held at zero (Fine-Pruning's "
                                      "recovery step; 0: ANP as published)", minimum=0)

    def __post_init__(self) -> None:
        _check_number("eps", self.eps, low=0.0)
        _check_int("steps", self.steps, low=1)
        _check_number("alpha", self.alpha, low=0.0, high=1.0)
        _check_number("mask_lr", self.mask_lr, low=0.0, open_low=True)
        _check_int("iterations", self.iterations, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_number("threshold", self.threshold, low=0.0, high=1.0)
        if self.max_acc_drop is not None:
            _check_number("max_acc_drop", self.max_acc_drop, low=0.0, high=1.0)
        _check_int("finetune_epochs", self.finetune_epochs, low=0)


def _check_number(name: str, value: object, *, low: float, high: float | None = None,
                  open_low: bool = False) -> None:
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if open_low else value >= low)
          and (high is None or value <= high))
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ConfigError(f"ANP setting {name} must be a number {bounds}, got {value!r}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"ANP setting {name} must be an integer >= {low}, got {value!r}")


class NeuronMasks:
    """One mask and two perturbations per channel of every affine BN of ``model``, applied by
    forward hooks (:meth:`attach`). ``perturbed`` switches the perturbations on."""

    def __init__(self, model: nn.Module, eps: float = 0.0) -> None:
        self.layers, self.skipped = batchnorm_layers(model)
        if not self.layers:
            raise ConfigError(f"ANP needs affine BatchNorm layers; {type(model).__name__} "
                              "has none")
        self.eps = float(eps)
        self.perturbed = False

        def per_channel(bn: nn.Module, value: float) -> torch.Tensor:
            return torch.full((bn.num_features,), value, device=bn.weight.device)

        self.masks = {n: per_channel(bn, 1.0).requires_grad_(True) for n, bn in self.layers.items()}
        self.deltas = {n: per_channel(bn, 0.0) for n, bn in self.layers.items()}
        self.xis = {n: per_channel(bn, 0.0) for n, bn in self.layers.items()}

    @property
    def num_channels(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def mask_params(self) -> list[torch.Tensor]:
        return list(self.masks.values())

    def noise(self) -> list[torch.Tensor]:
        return [*self.deltas.values(), *self.xis.values()]

    @contextmanager
    def attach(self) -> Iterator[NeuronMasks]:
        """Hook every BN for the duration of the block (hooks removed even on errors)."""
        handles = [bn.register_forward_hook(self._hook(name)) for name, bn in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
            mask = self.masks[name]
            if self.perturbed:
                return perturbed_bn_output(output, module.bias, mask + self.deltas[name],
                                           self.xis[name])
            return perturbed_bn_output(output, module.bias, mask)

        return hook

    @torch.no_grad()
    def randomize_noise(self, generator: torch.Generator | None = None) -> None:
        """The inner maximisation's start: delta, xi uniform in [-eps, eps]."""
        for t in self.noise():
            t.copy_(torch.rand(t.shape, generator=generator, device=t.device)
                    .mul_(2 * self.eps).sub_(self.eps))

    def ascend(self, loss_fn, lr: float) -> None:
        """One ascent step on ``loss_fn()``: noise += lr * sign(grad), clipped to [-eps, eps]
        (the reference takes the gradient's sign before its SGD step)."""
        noise = self.noise()
        for t in noise:
            t.requires_grad_(True)
        try:
            grads = torch.autograd.grad(loss_fn(), noise)
        finally:
            for t in noise:
                t.requires_grad_(False)
        with torch.no_grad():
            for t, g in zip(noise, grads, strict=True):
                t.add_(g.sign(), alpha=lr).clamp_(-self.eps, self.eps)

    @torch.no_grad()
    def clip_(self) -> None:
        for m in self.masks.values():
            m.clamp_(0.0, 1.0)

    def values(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the masks."""
        return {n: m.detach().float().cpu().clone() for n, m in self.masks.items()}


class _Iterations:
    """``n`` batches of ``loader`` as one pass, restarting it (the next epoch's order) when it
    runs out, so the loop counts iterations as the reference does rather than epochs."""

    def __init__(self, loader: Iterable, n: int) -> None:
        self.loader, self.n = loader, int(n)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        done = 0
        while done < self.n:
            empty = True
            for batch in self.loader:
                empty = False
                if done == self.n:
                    return
                yield batch
                done += 1
            if empty:
                raise DataError("ANP: the clean data loader yields no batches")


class PerturbedFlips:
    """Where the adversarial neuron perturbation sends the clean images it misclassifies:
    per block of ``block`` mask batches, a count per class of the perturbed predictions
    that differ from the label. ANP's observation is that a backdoored network, perturbed
    this way, collapses onto its target class; a clean one spreads its errors. Counted on
    the device from the ascent's own forward pass (no extra pass, no host sync)."""

    def __init__(self, num_classes: int, block: int, device: torch.device | str) -> None:
        self.block = max(1, int(block))
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.blocks: list[torch.Tensor] = []
        self._steps = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self._steps % self.block == 0:
            self.blocks.append(torch.zeros(self.num_classes, dtype=torch.long,
                                           device=self.device))
        self._steps += 1
        pred = logits.detach().argmax(1)
        # a scatter, not boolean indexing or bincount: both would wait for the device
        counted = (pred != y) & (pred < self.num_classes)
        self.blocks[-1].scatter_add_(0, pred.clamp(max=self.num_classes - 1), counted.long())

    def counts(self) -> list[list[int]]:
        return [b.cpu().tolist() for b in self.blocks]


def flip_summary(blocks: list[list[int]]) -> dict[str, Any] | None:
    """The class the perturbed errors go to most, over all blocks and the first one: its
    share of the errors and its robust z over the classes (median / 1.4826 MAD, as Neural
    Cleanse scores its candidates)."""
    if not blocks:
        return None
    total = torch.tensor(blocks, dtype=torch.float64).sum(0)
    first = torch.tensor(blocks[0], dtype=torch.float64)

    def score(counts: torch.Tensor) -> dict[str, float | int]:
        share = counts / counts.sum().clamp_min(1.0)
        med = share.median()
        mad = (share - med).abs().median() * 1.4826
        top = int(share.argmax())
        # no spread among the other classes: z is undefined (None), not infinite
        z = round(float((share[top] - med) / mad), 3) if mad > 0 else None
        return {"class": top, "share": float(share[top]), "z": z,
                "shares": [round(float(v), 4) for v in share]}

    return {"all": score(total), "first_block": score(first)}


def anp_step(model: nn.Module, masks: NeuronMasks, cfg: ANPSettings,
             generator: torch.Generator | None = None, flips: PerturbedFlips | None = None):
    """Step closure for :func:`fit`: inner ascent on the perturbations, then the mask loss
    ``alpha * CE(natural) + (1 - alpha) * CE(perturbed)``."""

    def ce(x: torch.Tensor, y: torch.Tensor, record: bool = False) -> torch.Tensor:
        logits = model(x)
        if record and flips is not None:
            flips.add(logits, y)
        return F.cross_entropy(logits.float(), y)

    def step(x: torch.Tensor, y: torch.Tensor, _idx: torch.Tensor):
        robust = x.new_zeros((), dtype=torch.float32)
        if cfg.eps > 0:
            masks.randomize_noise(generator)
            masks.perturbed = True
            try:
                for _ in range(cfg.steps):
                    masks.ascend(lambda: ce(x, y), cfg.eps / cfg.steps)
                robust = ce(x, y, record=True)
            finally:
                masks.perturbed = False
        logits = model(x)
        natural = F.cross_entropy(logits.float(), y)
        loss = cfg.alpha * natural + (1 - cfg.alpha) * robust
        return loss, {"train_acc": (logits.argmax(1) == y).sum(),
                      "natural_loss": natural.detach() * x.shape[0],
                      "robust_loss": robust.detach() * x.shape[0]}

    return step


def optimize_masks(teacher: nn.Module, loader: Iterable, cfg: ANPSettings, *,
                   device: torch.device | str = "cpu", amp: bool = True, seed: int = 0,
                   progress: bool = False, flips: PerturbedFlips | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[EpochResult]]:
    """ANP's mask optimisation on a frozen copy of ``teacher`` over ``cfg.iterations``
    batches of ``loader`` (batches ``(x, y, idx)``); returns the masks by BN name. With
    ``flips``, the perturbed predictions' errors are counted there."""
    model = copy.deepcopy(teacher).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = NeuronMasks(model, cfg.eps)
    generator = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    optim = OptimConfig(name="sgd", lr=cfg.mask_lr, momentum=0.9, weight_decay=0.0,
                        nesterov=False, schedule="constant")
    with masks.attach():
        history = fit(masks.mask_params(), anp_step(model, masks, cfg, generator, flips),
                      _Iterations(loader, cfg.iterations), 1, optim, train_modules=[model],
                      device=device, amp=amp, after_step=masks.clip_, progress=progress,
                      desc="ANP masks")
    return masks.values(), history


def pruned_channels(masks: Mapping[str, torch.Tensor],
                    threshold: float) -> dict[str, torch.Tensor]:
    """Per BN name, the boolean selection of the channels whose mask is below ``threshold``."""
    return {name: mask < threshold for name, mask in masks.items()}


def prune_by_masks(teacher: nn.Module, masks: Mapping[str, torch.Tensor],
                   threshold: float) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``teacher`` with the BN weight of every channel whose mask is below
    ``threshold`` set to 0 (bias kept), and the pruned count per layer."""
    model = copy.deepcopy(teacher)
    modules = resolve_modules(model, masks)
    for name, mask in masks.items():
        weight = modules[name].weight
        if mask.shape != weight.shape:
            raise ConfigError(f"ANP mask for {name!r} has shape {tuple(mask.shape)}, the "
                              f"BN weight {tuple(weight.shape)}")
    selected = pruned_channels(masks, threshold)
    hold_pruned(selected)(model)
    return model, {name: int(sel.sum()) for name, sel in selected.items()}


def hold_pruned(selected: Mapping[str, torch.Tensor]):
    """A function that sets the BN weight of the ``selected`` channels of a model to 0: it
    prunes them, and called after every fine-tuning step it keeps them pruned. The modules
    and the selections on their device are found once per model, and ``masked_fill_`` needs
    no host sync, so the per-step call stays cheap on a GPU."""
    bound: dict[str, Any] = {}

    def zero(model: nn.Module) -> None:
        if bound.get("model") is not model:
            modules = resolve_modules(model, selected)
            bound["model"] = model
            bound["targets"] = [(modules[name].weight, sel.to(modules[name].weight.device))
                                for name, sel in selected.items()]
        with torch.no_grad():
            for weight, sel in bound["targets"]:
                weight.masked_fill_(sel, 0.0)
    return zero


def choose_threshold(teacher: nn.Module, masks: Mapping[str, torch.Tensor], val,
                     ctx: DefenseContext, max_acc_drop: float) -> tuple[float, dict]:
    """The largest grid threshold whose held-out clean accuracy stays within
    ``max_acc_drop`` of the unpruned teacher's (0.0, no pruning, when none does)."""
    base = accuracy(teacher, val, ctx.mean, ctx.std, device=ctx.device)
    candidates = []
    for threshold in THRESHOLD_GRID:
        pruned, counts = prune_by_masks(teacher, masks, threshold)
        acc = accuracy(pruned, val, ctx.mean, ctx.std, device=ctx.device)
        candidates.append({"threshold": threshold, "val_acc": acc,
                           "pruned": sum(counts.values())})
    ok = [c["threshold"] for c in candidates if c["val_acc"] >= base - max_acc_drop - 1e-12]
    chosen = max(ok) if ok else 0.0
    return chosen, {"val_images": len(val), "val_acc_unpruned": base, "candidates": candidates}


def mask_stats(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([m.flatten() for m in masks.values()])
    return {"min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
            "median": float(flat.median()), "below_0.5": int((flat < 0.5).sum()),
            "zero": int((flat == 0).sum())}


@register_teacher_defense("anp", ANPSettings, help="adversarial neuron pruning (Wu & Wang 2021)")
def anp_defense(teacher: nn.Module, ctx: DefenseContext,
                cfg: ANPSettings) -> tuple[nn.Module, dict]:
    """Optimise the neuron masks on the clean data, then prune a fresh copy of the teacher."""
    if len(ctx.clean) == 0:
        raise DataError("ANP needs clean data, got an empty clean subset")
    search = None
    mask_data, val = ctx.clean, None
    if cfg.max_acc_drop is not None:
        mask_data, val = split_validation(ctx.clean, VAL_FRACTION, seed=ctx.seed)
        if len(val) == 0:
            raise DataError("ANP max_acc_drop needs a validation part, but no class of the "
                            "clean subset has 2 or more images")
    loader = dataclasses.replace(ctx, clean=mask_data).loader(cfg.batch_size)
    flips = PerturbedFlips(len(ctx.clean.classes), math.ceil(cfg.iterations / FLIP_BLOCKS),
                           ctx.device)
    started = time.perf_counter()
    masks, history = optimize_masks(teacher, loader, cfg, device=ctx.device, amp=ctx.amp,
                                    seed=ctx.seed, progress=ctx.progress, flips=flips)
    mask_seconds = time.perf_counter() - started
    threshold = cfg.threshold
    if cfg.max_acc_drop is not None:
        threshold, search = choose_threshold(teacher, masks, val, ctx, cfg.max_acc_drop)
    model, counts = prune_by_masks(teacher, masks, threshold)
    finetune_history = []
    if cfg.finetune_epochs > 0:
        recovery = FinetuneSettings()
        model, finetune_history = finetune_copy(
            model, ctx, epochs=cfg.finetune_epochs, optim=finetune_optim(recovery),
            batch_size=recovery.batch_size, desc="fine-tune pruned copy",
            after_step=hold_pruned(pruned_channels(masks, threshold)))
    _, skipped = batchnorm_layers(teacher)
    return model.eval(), {
        "threshold": threshold,
        "threshold_choice": "fixed" if search is None else "max_acc_drop",
        "threshold_search": search,
        "mask_images": len(mask_data),
        "bn_layers": len(masks),
        "channels": sum(m.numel() for m in masks.values()),
        "pruned": sum(counts.values()),
        "pruned_per_layer": counts,
        "skipped_layers": skipped,
        "mask_stats": mask_stats(masks),
        "mask_seconds": mask_seconds,
        "perturbed_flips": flips.counts(),
        "perturbed_flip_class": flip_summary(flips.counts()),
        "masks": {name: m.tolist() for name, m in masks.items()},
        "history": [h.as_dict() for h in history],
        "finetune_history": [h.as_dict() for h in finetune_history],
    }
