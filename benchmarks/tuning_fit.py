"""Is a defended teacher fitted to the defender's images?

Distillation runs on the defender's clean images, and a tuning defence (fine-tuning, FST)
trains the teacher copy on exactly those. This script measures, without the test set or
the trigger, how each model classifies a sample of the defender's images against the same
number of the *other* training images (which the original teacher saw as often): eval-mode
accuracy, mean cross-entropy and mean top-1 probability. A gap between the two says the copy
is fitted to the images the student will imitate it on.

    python benchmarks/tuning_fit.py --data-root ../shared/data \\
        --teacher runs/bench/runs/<teacher> --defended runs/bench/runs/<fst cell> ...

A cross-fitted cell (``--defense crossfit``) is read as distillation reads it: each of the
defender's images by the copy that never tuned on it (``defender_unseen``), and, for the
comparison, by the other copies (``defender_seen``). One JSON line per model.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from robustkd.api.data import run_data
from robustkd.data.loader import normalize
from robustkd.data.subsets import per_class_rows
from robustkd.io import read_json
from robustkd.models.folded import FoldedTeacher
from robustkd.runs import load_run


@torch.no_grad()
def fit_stats(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              mean: Sequence[float], std: Sequence[float], batch: int = 500
              ) -> dict[str, float]:
    """Accuracy, mean cross-entropy and mean top-1 probability of ``model`` (eval mode) on
    uint8 ``images``."""
    model.eval()
    right = loss = conf = 0.0
    for i in range(0, len(labels), batch):
        x = normalize(images[i:i + batch].float() / 255, mean, std)
        y = labels[i:i + batch]
        logits = model(x).float()
        right += float((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        conf += float(logits.softmax(1).amax(1).sum())
    n = max(len(labels), 1)
    return {"acc": round(right / n, 4), "nll": round(loss / n, 4), "conf": round(conf / n, 4)}


def sample_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]]


def folded_stats(folded: FoldedTeacher, rows: torch.Tensor, clean_rows: torch.Tensor,
                 images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float]) -> dict[str, dict[str, float]]:
    """Each sampled defender image by the copy that never tuned on it, and by the others
    (``rows`` index the training set; ``clean_rows[i]`` is the training row of clean row i,
    whose fold is ``folded.folds[i]``)."""
    if len(folded.folds) != len(clean_rows):
        raise SystemExit(f"the cross-fitted teacher's folds cover {len(folded.folds)} images, "
                         f"the defender's set has {len(clean_rows)}: give its --clean-fraction "
                         "and --clean-seed (a validation probe's cell distilled on fewer)")
    fold_of = dict(zip(clean_rows.tolist(), folded.folds.tolist(), strict=True))
    folds = torch.tensor([fold_of[r] for r in rows.tolist()])
    out: dict[str, list[tuple[int, dict[str, float]]]] = {"unseen": [], "seen": []}
    for k, model in enumerate(folded.copies):
        for key, pick in (("unseen", rows[folds == k]), ("seen", rows[folds != k])):
            if len(pick):
                out[key].append((len(pick), fit_stats(model, images[pick], labels[pick],
                                                      mean, std)))
    return {f"defender_{key}": {m: round(sum(n * s[m] for n, s in parts)
                                         / sum(n for n, _ in parts), 4)
                                for m in ("acc", "nll", "conf")}
            for key, parts in out.items()}


def defended_model(teacher: nn.Module, cell: Path) -> nn.Module:
    """The teacher copy a defence cell saved (a folded teacher for ``crossfit``)."""
    folded = read_json(cell / "defense.json").get("folded")
    model = (FoldedTeacher.like(teacher, folded["copies"], folded["rows"]) if folded
             else copy.deepcopy(teacher))
    model.load_state_dict(load_file(str(cell / "defended_teacher.safetensors")))
    return model


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the (suspect) teacher's run")
    p.add_argument("--defended", action="append", default=[],
                   help="a defence cell whose defended teacher copy to read")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clean-fraction", type=float, default=0.2,
                   help="the defender's per-class share of the training set")
    p.add_argument("--clean-seed", type=int, default=0, help="the seed that chose it")
    p.add_argument("--images", type=int, default=5000, help="images of each kind")
    args = p.parse_args(argv)
    teacher = load_run(args.teacher, "cpu")
    splits, _ = run_data(teacher.meta, args.data_root)
    train = splits.train
    clean = torch.from_numpy(per_class_rows(train, args.clean_fraction, seed=args.clean_seed))
    mask = torch.ones(len(train.labels), dtype=torch.bool)
    mask[clean] = False
    defender = sample_rows(clean, args.images, 1)
    other = sample_rows(torch.nonzero(mask).flatten(), args.images, 0)
    models = [("teacher", Path(args.teacher), teacher.model)]
    models += [("defended", Path(c), defended_model(teacher.model, Path(c)))
               for c in args.defended]
    for kind, run, model in models:
        row = {"kind": kind, "run": run.name, "images": len(defender)}
        if isinstance(model, FoldedTeacher):
            row.update(folded_stats(model, defender, clean, train.images, train.labels,
                                    splits.mean, splits.std))
        else:
            row["defender"] = fit_stats(model, train.images[defender],
                                        train.labels[defender], splits.mean, splits.std)
        row["other_train"] = fit_stats(model, train.images[other], train.labels[other],
                                       splits.mean, splits.std)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
