"""RobustKD's mask-threshold (tau) selection among several candidates (paper Algorithm 1).

``oracle`` distils a student per threshold and measures ASR with the real trigger (research
only: a defender has no trigger); ``blind`` uses clean data only: it keeps the threshold
whose detoxified teacher lowers the last layer's per-example feature variance the most while
its clean validation accuracy stays within ``epsilon`` of the undetoxified teacher's.
Rationale: the paper's Finding 2 links backdoors to high feature variance, and the accuracy
bound keeps the detoxified teacher worth distilling; both are measurable without the trigger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from robustkd.data.dataset import ImageDataset
from robustkd.data.subsets import split_validation
from robustkd.defenses.detox import DetoxMasks, DetoxSettings, train_detox_masks
from robustkd.distill.run import DistillRun, distill_student
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import accuracy, evaluate_model, feature_variance
from robustkd.models.taps import tap
from robustkd.training.loop_settings import LoopSettings


def detoxified_stats(teacher: nn.Module, masks: DetoxMasks | None, ds: ImageDataset,
                     mean, std, device) -> dict[str, float]:
    """Clean accuracy and mean last-layer feature variance of the (detoxified) teacher."""
    last = masks.names[-1] if masks is not None else None
    replace = masks.replacements() if masks is not None else {}
    with tap(teacher, replace=replace):
        acc = accuracy(teacher, ds, mean, std, device=device)
        var = feature_variance(teacher, [last], ds, mean, std, device=device)[last] if last \
            else None
    return {"acc": acc, "variance": float(var.mean()) if var is not None else float("nan")}


def select_blind(candidates: list[dict[str, Any]], base: dict[str, float],
                 epsilon: float) -> dict[str, Any]:
    """Largest variance reduction among thresholds whose clean accuracy >= base - epsilon."""
    ok = [c for c in candidates if c["val_acc"] >= base["acc"] - epsilon]
    if not ok:
        return max(candidates, key=lambda c: c["val_acc"])
    return min(ok, key=lambda c: (c["val_variance"], -c["val_acc"]))


def select_oracle(candidates: list[dict[str, Any]], acc0: float,
                  epsilon: float) -> dict[str, Any]:
    """Algorithm 1: among students with ACC >= ACC_0 - epsilon, the lowest ASR (then the
    highest ACC); if none qualifies, the most accurate."""
    ok = [c for c in candidates if c["student_acc"] >= acc0 - epsilon]
    if not ok:
        return max(candidates, key=lambda c: c["student_acc"])
    return min(ok, key=lambda c: (c["student_asr"], -c["student_acc"]))


def choose_blind(teacher: nn.Module, clean: ImageDataset, names: Sequence[str],
                 taus: Sequence[float], *, val_fraction: float, epsilon: float,
                 detox: Callable[[float], DetoxSettings], loop: LoopSettings,
                 report: dict[str, Any]) -> tuple[float, DetoxMasks, float]:
    """Masks per threshold on the clean data minus a validation split, judged on that split
    by :func:`select_blind`; returns the chosen tau, its masks and the detox seconds (the
    candidates and the undetoxified baseline go into ``report``)."""
    mean, std, device, seed = loop.mean, loop.std, loop.device, loop.seed
    train_part, val_part = split_validation(clean, val_fraction, seed)
    base = detoxified_stats(teacher, None, val_part, mean, std, device)
    last = names[-1]
    with torch.no_grad():
        base["variance"] = float(feature_variance(teacher, [last], val_part, mean, std,
                                                  device=device)[last].mean())
    report["undetoxified"] = base
    started = time.perf_counter()
    trained = {}
    for tau in taus:
        masks, _ = train_detox_masks(teacher, train_part, names, detox(tau), loop)
        stats = detoxified_stats(teacher, masks, val_part, mean, std, device)
        trained[tau] = masks
        report["candidates"].append({"tau": tau, "val_acc": stats["acc"],
                                     "val_variance": stats["variance"]})
    chosen = select_blind(report["candidates"], base, epsilon)
    return chosen["tau"], trained[chosen["tau"]], time.perf_counter() - started


def choose_oracle(teacher: nn.Module, student: nn.Module, clean: ImageDataset,
                  test: ImageDataset | None, names: Sequence[str], taus: Sequence[float], *,
                  epsilon: float, detox: Callable[[float], DetoxSettings], run: DistillRun,
                  distill_kw: dict[str, Any], student_factory: Callable[[], nn.Module] | None,
                  report: dict[str, Any]) -> tuple[float, DetoxMasks, float, float]:
    """A student distilled per threshold (``distill_kw``: :func:`distill_student`'s
    keywords besides ``run``), the best by :func:`select_oracle` loaded into ``student``;
    returns the chosen tau, its masks, detox and distillation seconds."""
    trigger, target, loop = run.trigger, run.target, distill_kw["loop"]
    if trigger is None or target is None:
        raise ConfigError("oracle selection measures ASR and needs the teacher's trigger; "
                          "use --robustkd-selection blind (the defender's setting)")
    if student_factory is None:
        raise ConfigError("oracle selection needs a student factory (one student per tau)")
    mean, std, device, seed = loop.mean, loop.std, loop.device, loop.seed
    best = acc0 = None
    detox_seconds = distill_seconds = 0.0
    for tau in taus:
        started = time.perf_counter()
        masks, _ = train_detox_masks(teacher, clean, names, detox(tau), loop)
        detox_seconds += time.perf_counter() - started
        # every candidate is built and trained from the same random state, so tau is all
        # that differs (forked: the caller's global random state is left as it was)
        started = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            cand_student = student_factory()
            distill_student(teacher, cand_student, clean, None, run=run,
                            teacher_replace=masks.replacements(), **distill_kw)
        distill_seconds += time.perf_counter() - started
        m = evaluate_model(cand_student, test, mean, std, trigger=trigger, target=target,
                           device=device)
        report["candidates"].append({"tau": tau, "student_acc": m["acc"],
                                     "student_asr": m["asr"]})
        if acc0 is None:
            acc0 = evaluate_model(teacher, test, mean, std, device=device)["acc"]
        if best is None or select_oracle([best[0], report["candidates"][-1]], acc0,
                                         epsilon) is report["candidates"][-1]:
            best = (report["candidates"][-1], masks, cand_student)
    student.load_state_dict(best[2].state_dict())
    return best[0]["tau"], best[1], detox_seconds, distill_seconds
