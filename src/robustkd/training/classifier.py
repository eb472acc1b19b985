"""Supervised training of a classifier (clean teachers, poisoning, fine-tuning) on the one loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks.triggers import Trigger
from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.evaluation.metrics import evaluate_model
from robustkd.training.loop import EpochResult, fit
from robustkd.training.optim import OptimConfig


def classification_step(model: nn.Module):
    """Cross-entropy step that also sums correct predictions for the train-accuracy log."""

    def step(x: torch.Tensor, y: torch.Tensor, _idx: torch.Tensor):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_acc": (logits.argmax(1) == y).sum()}

    return step


def train_classifier(
    model: nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: dict | None,
    epochs: int,
    optim: OptimConfig,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    trigger: Trigger | None = None,
    target: int | None = None,
    eval_every: int = 1,
    state_dir: str | Path | None = None,
    resume: bool = False,
    amp: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train ``model`` with cross-entropy, evaluating ACC (and ASR) every ``eval_every`` epochs.

    Evaluation results land in each epoch's ``extra`` dict before ``on_epoch_end`` (which
    callers use to write a checkpoint per epoch).
    """
    device = torch.device(device)
    loader = DeviceLoader(train, batch_size, device=device, mean=mean, std=std, shuffle=True,
                          augment=augment, drop_last=len(train) > batch_size, seed=seed,
                          channels_last=channels_last)

    def epoch_end(result: EpochResult) -> None:
        if eval_every and (result.epoch % eval_every == 0 or result.epoch == epochs):
            metrics = evaluate_model(model, test, mean, std, trigger=trigger, target=target,
                                     device=device, batch_size=max(batch_size, 256))
            result.extra.update({f"test_{k}": v for k, v in metrics.items()})
        if on_epoch_end is not None:
            on_epoch_end(result)

    forward = torch.compile(model) if compile else model
    return fit(model.parameters(), classification_step(forward), loader, epochs, optim,
               train_modules=[model], state_modules={"model": model}, device=device, amp=amp,
               on_epoch_end=epoch_end, state_dir=state_dir, resume=resume, progress=progress,
               desc=desc)
