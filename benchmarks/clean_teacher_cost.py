"""What the default RobustKD's teacher transform costs a teacher that has no backdoor.

Runs the default preset's pruning (``cfg.prune`` with its options) on a teacher run, on the
defender's clean subset the benchmark uses (``--clean-fraction`` per class, ``--clean-seed``),
and prints one JSON line: channels pruned, test ACC before and after, seconds. A blind
defence is applied to every teacher, clean or not, so what it takes from a clean one is its
price; the student-level price needs a distillation run from the pruned copy.

    OMP_NUM_THREADS=1 python benchmarks/clean_teacher_cost.py \\
        --teacher runs/bench/runs/bench-cifar10-wrn16_2-clean-da91618240 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json

import torch

from robustkd.api.data import run_data
from robustkd.defenses.registry import DefenseContext, defend_teacher
from robustkd.defenses.robustkd import robustkd_config
from robustkd.evaluation.metrics import evaluate_model
from robustkd.experiments.scales import get_scale
from robustkd.runs import load_teacher
from robustkd.utils import describe_device, resolve_device

# the benchmark's defender subset (the default of --clean-fraction/--clean-seed)
BENCH = get_scale("mini").benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a teacher run directory")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clean-fraction", type=float, default=BENCH.clean_fraction)
    p.add_argument("--clean-seed", type=int, default=BENCH.clean_seed)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, help="RobustKD preset (default: the default)")
    p.add_argument("--prune-iterations", type=int, default=None,
                   help="override the preset's prune_iterations")
    args = p.parse_args()
    options = {} if args.preset is None else {"preset": args.preset}
    if args.prune_iterations is not None:
        options["prune_iterations"] = args.prune_iterations
    cfg = robustkd_config(options)
    preset = cfg.extra["preset"]
    if cfg.prune == "none":
        raise SystemExit(f"clean_teacher_cost: preset {preset!r} prunes nothing")
    device = resolve_device(args.device)
    parent = load_teacher(args.teacher, device, "--teacher", False)
    splits, clean = run_data(parent.meta, args.data_root, args.clean_fraction, args.clean_seed)
    ctx = DefenseContext(clean=clean, mean=splits.mean, std=splits.std,
                         augment=splits.augment, device=device, seed=args.seed,
                         test=splits.test, progress=False)
    before = evaluate_model(parent.model, splits.test, splits.mean, splits.std)
    pruned, report = defend_teacher(cfg.prune, parent.model, ctx, cfg.prune_options())
    print(json.dumps({"teacher": args.teacher, "preset": preset, "prune": cfg.prune,
                      "options": cfg.prune_options(), "clean_images": len(clean),
                      "channels": report.get("channels"), "pruned": report.get("pruned"),
                      "test_acc_before": round(before["acc"], 4),
                      "test_acc_after": round(report["cleaned_teacher_metrics"]["acc"], 4),
                      "seconds": round(report["seconds"], 1), "seed": args.seed,
                      "device": describe_device(device),
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
