"""Cross-fitted tuning: split the defender's images into folds, clean one copy of the teacher
per fold on the *other* folds with a tuning defence (FST by default), and distil each image
from the copy that never saw it.

Tuning defences (fine-tuning, FST) stop a backdoor from crossing FKD, but their students
lose accuracy against FKD's, and a tuned teacher is fitted to exactly the images the student
then distils on (docs/RESULTS.md). Cross-fitting keeps the tuning's total cost (each copy
tunes on ``1 - 1/folds`` of the images) and gives the student, for every image, a teacher
that answers as on unseen data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from robustkd.defenses.registry import (
    DefenseContext,
    get_teacher_defense,
    make_settings,
    register_teacher_defense,
)
from robustkd.models.folded import FoldedTeacher, assign_folds
from robustkd.settings import setting

TUNINGS = ("fst", "finetune")


@dataclass(frozen=True)
class CrossfitSettings:
    """Which tuning each copy runs (with its own defaults), and over how many folds."""

    inner: str = setting("fst", "the tuning defence each copy runs", choices=TUNINGS)
    folds: int = setting(2, "folds of the defender's images (one tuned copy each)", minimum=2)
    epochs: int | None = setting(None, "the tuning's epochs (default: the tuning's own)",
                                 minimum=0)


@register_teacher_defense("crossfit", CrossfitSettings,
                          help="cross-fitted tuning: one copy per fold of the clean images, "
                               "tuned on the other folds; each image is distilled from the "
                               "copy that never saw it", standalone=False)
def crossfit_defense(teacher: nn.Module, ctx: DefenseContext,
                     cfg: CrossfitSettings) -> tuple[nn.Module, dict[str, Any]]:
    """The folded teacher, with each copy's tuning report and test metrics."""
    spec = get_teacher_defense(cfg.inner)
    inner = make_settings(spec, None if cfg.epochs is None else {"epochs": cfg.epochs})
    folds = assign_folds(ctx.clean.labels, cfg.folds, ctx.seed)
    copies, reports = [], []
    for k in range(cfg.folds):
        rows = torch.nonzero(folds != k).flatten()
        sub = replace(ctx, clean=ctx.clean.subset(rows))
        model, details = spec.run(teacher, sub, inner)
        model.eval()
        copies.append(model)
        reports.append({"fold": k, "images": len(rows), "metrics": ctx.evaluate(model),
                        **details})
    return FoldedTeacher(copies, folds), {
        "inner_settings": {"name": cfg.inner, **asdict(inner)},
        "folded": {"copies": cfg.folds, "rows": len(folds)}, "copies": reports}
