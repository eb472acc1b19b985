"""What ANP's pruning threshold does to a teacher, from masks an ANP run already saved.

ANP's paper prunes the channels whose mask ends below 0.2; BackdoorBench prunes by the largest
threshold (up to 0.9) that keeps clean accuracy within a bound. This probe reads the masks of
a finished ANP run (``defense.json``, ``prune/defense.json`` of a RobustKD run that pruned, or
the defence in ``record.json``), prunes the teacher at every threshold of ANP's grid and
prints one JSON line per threshold: channels pruned, accuracy on a held-out part of the
defender's clean subset (what a blind rule may read), and the test ACC / ASR / R-ACC on a
per-class share of the test set (diagnosis only: nothing may be chosen with them).

    OMP_NUM_THREADS=1 python benchmarks/anp_prune_curve.py --data-root ../shared/data \\
        --run runs/bench/runs/<teacher>-wrn16_1-anp-short-s0-<id> \\
        --teacher runs/bench/runs/<teacher>-<id>
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robustkd.api.data import run_data
from robustkd.data.subsets import split_validation
from robustkd.defenses.anp import THRESHOLD_GRID, VAL_FRACTION, prune_by_masks
from robustkd.evaluation.metrics import accuracy, evaluate_model
from robustkd.experiments.scales import get_scale
from robustkd.runs import load_teacher
from robustkd.utils import describe_device

BENCH = get_scale("mini").benchmark


def saved_masks(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The ANP masks a finished run saved: its defence report, or (a run restored from its
    record only) the record's ``defense``."""
    reports = [run / "defense.json", run / "prune" / "defense.json"]
    for path in [*reports, run / "record.json"]:
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        if path.name == "record.json":
            report = report.get("defense") or {}
        if report.get("name") == "anp" and report.get("masks"):
            return {k: torch.tensor(v) for k, v in report["masks"].items()}, report
    raise SystemExit(f"anp_prune_curve: --run {run} has no ANP masks (defense.json or the "
                     "record's defence)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a finished run that pruned by ANP")
    p.add_argument("--teacher", required=True, help="the teacher run the masks belong to")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clean-fraction", type=float, default=BENCH.clean_fraction)
    p.add_argument("--clean-seed", type=int, default=BENCH.clean_seed)
    p.add_argument("--val-seed", type=int, default=0, help="seed of the held-out clean part")
    p.add_argument("--test-share", type=float, default=0.2,
                   help="per-class share of the test set measured (speed)")
    args = p.parse_args()
    if not 0.0 < args.test_share <= 1.0:
        raise SystemExit(f"anp_prune_curve: --test-share must be in (0, 1], got {args.test_share}")
    masks, report = saved_masks(args.run)
    parent = load_teacher(args.teacher, "cpu", "--teacher", False)
    splits, clean = run_data(parent.meta, args.data_root, args.clean_fraction, args.clean_seed)
    _, val = split_validation(clean, VAL_FRACTION, seed=args.val_seed)
    test = splits.test if args.test_share == 1.0 else \
        split_validation(splits.test, args.test_share, seed=0)[1]
    mean, std = splits.mean, splits.std
    common = {"run": args.run.name, "mask_iterations": report["settings"]["iterations"],
              "val_images": len(val), "test_images": len(test),
              "device": describe_device(torch.device("cpu")),
              "threads": torch.get_num_threads()}
    for threshold in (0.0, *THRESHOLD_GRID):
        started = time.perf_counter()
        model, counts = prune_by_masks(parent.model, masks, threshold)
        model.eval()
        metrics = evaluate_model(model, test, mean, std, parent.trigger, parent.target)
        line = {**common, "threshold": threshold, "pruned": sum(counts.values()),
                "val_acc": round(accuracy(model, val, mean, std), 4),
                **{f"test_{k}": round(v, 4) for k, v in metrics.items()},
                "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
