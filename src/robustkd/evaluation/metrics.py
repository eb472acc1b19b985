"""ACC, ASR and per-example feature variance (METHOD.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.data.streaming import StreamedImageFolder, is_streamed, loader_for
from robustkd.models.taps import tap
from robustkd.triggers import Trigger


def per_example_variance(feature: torch.Tensor) -> torch.Tensor:
    """Variance of all elements of each example's feature map, ``[B]`` (Eq. 8's quantity)."""
    return feature.float().flatten(1).var(dim=1)


def triggered_test_set(ds: ImageDataset, trigger: Trigger, target: int) -> ImageDataset:
    """Triggered copies of the test images whose true label is not ``target`` (for ASR)."""
    keep = torch.nonzero(ds.labels != target).flatten()
    images = trigger.apply_uint8(ds.images[keep])
    return ImageDataset(images, ds.labels[keep].clone(), list(ds.classes),
                        name=f"{ds.name}+trigger", is_poison=torch.ones(len(keep), dtype=bool))


@torch.no_grad()
def predict(model: nn.Module, ds: ImageDataset | StreamedImageFolder, mean: Sequence[float],
            std: Sequence[float], *, batch_size: int = 512, device: torch.device | str = "cpu",
            workers: int | None = None, trigger: Trigger | None = None) -> torch.Tensor:
    """Arg-max predictions for every image of ``ds`` (model in eval mode, restored after).

    ``ds`` may be streamed from disk (``workers`` decode it; ``trigger`` is then applied per
    batch, since a streamed set cannot be triggered ahead of time).
    """
    was_training = model.training
    model.eval()
    loader = loader_for(ds, batch_size, device=device, mean=mean, std=std, workers=workers,
                        trigger=trigger)
    preds = [model(x).argmax(1) for x, _y, _idx in loader]
    model.train(was_training)
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, ds: ImageDataset | StreamedImageFolder, mean: Sequence[float],
             std: Sequence[float], **kw) -> float:
    """Top-1 accuracy on ``ds`` as a fraction."""
    preds = predict(model, ds, mean, std, **kw)
    return float((preds == ds.labels).float().mean()) if len(ds) else float("nan")


def triggered_metrics(model: nn.Module, ds: ImageDataset | StreamedImageFolder,
                      trigger: Trigger, target: int, mean: Sequence[float],
                      std: Sequence[float], **kw) -> dict[str, float]:
    """ASR and R-ACC on the triggered non-target test images, from one forward pass.

    ASR: the fraction classified as ``target``. R-ACC (robust accuracy): the fraction still
    classified as their true label - a removed backdoor should restore it, not just move
    triggered images to a third class. Target-class images are excluded: counting them
    would credit the backdoor for correct clean predictions (the authors' code includes
    them, which inflates ASR slightly).
    """
    if is_streamed(ds):  # same images, triggered batch by batch as they are decoded
        poisoned = ds.subset(torch.nonzero(ds.labels != target).flatten())
        preds = predict(model, poisoned, mean, std, trigger=trigger, **kw)
    else:
        poisoned = triggered_test_set(ds, trigger, target)
        preds = predict(model, poisoned, mean, std, **kw)
    if not len(poisoned):
        return {"asr": float("nan"), "racc": float("nan")}
    return {"asr": float((preds == target).float().mean()),
            "racc": float((preds == torch.as_tensor(poisoned.labels)).float().mean())}


def attack_success_rate(model: nn.Module, ds: ImageDataset | StreamedImageFolder,
                        trigger: Trigger, target: int, mean: Sequence[float],
                        std: Sequence[float], **kw) -> float:
    """Fraction of triggered non-target test images classified as ``target``."""
    return triggered_metrics(model, ds, trigger, target, mean, std, **kw)["asr"]


@torch.no_grad()
def feature_variance(model: nn.Module, layers: Sequence[str], ds: ImageDataset,
                     mean: Sequence[float], std: Sequence[float], *, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per-example variance of all elements of each layer's feature map, ``{layer: [N]}``."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    loader = DeviceLoader(ds, batch_size, device=device, mean=mean, std=std)
    with tap(model, layers, detach=True) as taps:
        for x, _y, _idx in loader:
            model(x)
            for name in layers:
                out[name].append(taps[name].flatten(1).float().var(dim=1).cpu())
    model.train(was_training)
    return {name: torch.cat(vals) for name, vals in out.items()}


@torch.no_grad()
def mean_features(model: nn.Module, ds: ImageDataset, names: Sequence[str],
                  mean: Sequence[float], std: Sequence[float], *, device="cpu",
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Average output ``[C, H, W]`` of each named module over ``ds`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    with tap(model, names, detach=True) as taps:
        for x, _y, _idx in DeviceLoader(ds, batch_size, device=device, mean=mean, std=std):
            model(x)
            for name in names:
                sums[name] = sums.get(name, 0) + taps[name].float().sum(0)
    model.train(was_training)
    return {name: value / len(ds) for name, value in sums.items()}


def evaluate_model(model: nn.Module, test: ImageDataset | StreamedImageFolder,
                   mean: Sequence[float], std: Sequence[float], trigger: Trigger | None = None,
                   target: int | None = None, **kw) -> dict[str, float]:
    """``{"acc", "asr", "racc"}`` (ASR and R-ACC only when a trigger and target are known)."""
    metrics = {"acc": accuracy(model, test, mean, std, **kw)}
    if trigger is not None and target is not None:
        metrics.update(triggered_metrics(model, test, trigger, target, mean, std, **kw))
    return metrics
