"""Supervised training of a classifier (clean teachers, poisoning, fine-tuning) on the one loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.streaming import StreamedImageFolder, loader_for
from robustkd.evaluation.metrics import evaluate_model
from robustkd.models.taps import tap
from robustkd.training.loop import EpochResult, fit
from robustkd.training.optim import OptimConfig
from robustkd.triggers import Trigger


@dataclass
class ExtraLoss:
    """A term added to cross-entropy, computed from features of the same forward pass.

    ``fn(features, logits, y, idx)`` gets the outputs of the modules named in ``layers``
    (read with taps, so no second forward pass and no model surgery) and the batch's dataset
    indices; adaptive attacks use it, e.g. to keep feature variance low while poisoning.
    """

    fn: Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor],
                 torch.Tensor]
    layers: Sequence[str] = ()
    name: str = "extra_loss"


def classification_step(model: nn.Module, extra_loss: ExtraLoss | None = None,
                        tap_model: nn.Module | None = None):
    """Cross-entropy step (plus an optional :class:`ExtraLoss`) that also sums correct
    predictions for the train-accuracy log. ``tap_model`` is the module whose submodules the
    extra loss reads when ``model`` is a compiled wrapper of it."""

    def step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        if extra_loss is None:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return loss, {"train_acc": (logits.argmax(1) == y).sum()}
        with tap(tap_model or model, extra_loss.layers) as taps:
            logits = model(x)
        term = extra_loss.fn({n: taps[n] for n in extra_loss.layers}, logits, y, idx)
        loss = F.cross_entropy(logits, y) + term
        return loss, {"train_acc": (logits.argmax(1) == y).sum(),
                      extra_loss.name: term.detach().float() * x.shape[0]}

    return step


def train_classifier(
    model: nn.Module,
    train: ImageDataset | StreamedImageFolder,
    test: ImageDataset | StreamedImageFolder,
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
    extra_loss: ExtraLoss | None = None,
    trainable: nn.Module | None = None,
    workers: int | None = None,
) -> list[EpochResult]:
    """Train ``model`` with cross-entropy, evaluating ACC (and ASR) every ``eval_every`` epochs.

    Evaluation results land in each epoch's ``extra`` dict before ``on_epoch_end`` (which
    callers use to write a checkpoint per epoch). ``extra_loss`` adds a term to the loss
    (logged per epoch under its name). ``trainable`` (a submodule, e.g. the classifier head)
    restricts learning to it: the rest of the model stays frozen in eval mode, as in
    last-layer fine-tuning. ``train``/``test`` may be streamed from disk
    (:class:`~robustkd.data.streaming.StreamedImageFolder`, decoded by ``workers``
    processes; their own transform replaces ``augment``).
    """
    device = torch.device(device)
    loader = loader_for(train, batch_size, device=device, mean=mean, std=std, shuffle=True,
                        augment=augment, drop_last=len(train) > batch_size, seed=seed,
                        channels_last=channels_last, workers=workers)

    def epoch_end(result: EpochResult) -> None:
        if eval_every and (result.epoch % eval_every == 0 or result.epoch == epochs):
            metrics = evaluate_model(model, test, mean, std, trigger=trigger, target=target,
                                     device=device, batch_size=max(batch_size, 256),
                                     workers=workers)
            result.extra.update({f"test_{k}": v for k, v in metrics.items()})
        if on_epoch_end is not None:
            on_epoch_end(result)

    forward = torch.compile(model) if compile else model
    step = classification_step(forward, extra_loss, tap_model=model)
    learner = model if trainable is None else trainable
    own = {id(p) for p in learner.parameters()}
    frozen = ([p for p in model.parameters() if id(p) not in own and p.requires_grad]
              if trainable is not None else [])
    if trainable is not None:
        model.eval()  # frozen BNs keep their running statistics
    try:
        for p in frozen:
            p.requires_grad_(False)
        return fit(learner.parameters(), step, loader, epochs, optim,
                   train_modules=[learner], state_modules={"model": model}, device=device,
                   amp=amp, on_epoch_end=epoch_end, state_dir=state_dir, resume=resume,
                   progress=progress, desc=desc)
    finally:
        for p in frozen:
            p.requires_grad_(True)
