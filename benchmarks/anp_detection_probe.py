"""Does ANP's own perturbation say, blind, whether a teacher has a backdoor and which class?

ANP perturbs the BN neurons adversarially on clean images; a backdoored network so perturbed
tends to predict its target class. The defence counts where its perturbed predictions go
(``perturbed_flips`` in its report, no extra pass). This probe runs a preset's ANP pruning
(``anp-prune``, the former default, unless ``--preset`` names another) on each teacher run,
on the benchmark's defender subset, without the test set, and prints one JSON line per
teacher: the class the perturbed errors go to most, its share and robust z (over all mask
batches and the first tenth), channels pruned, seconds. The attack's target is printed
beside, read from the teacher's meta for the reading only.

    OMP_NUM_THREADS=1 python benchmarks/anp_detection_probe.py --data-root ../shared/data \\
        --teacher runs/bench/runs/bench-cifar10-wrn16_2-clean-da91618240 --save runs/det.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robustkd.api.data import run_data
from robustkd.defenses.registry import DefenseContext, defend_teacher
from robustkd.defenses.robustkd import robustkd_config
from robustkd.experiments.scales import get_scale
from robustkd.runs import load_teacher
from robustkd.utils import describe_device, resolve_device

# the benchmark's defender subset (the default of --clean-fraction/--clean-seed)
BENCH = get_scale("mini").benchmark


def probe(teacher_dir: str, args: argparse.Namespace) -> dict:
    options = {"preset": args.preset}
    if args.prune_iterations is not None:
        options["prune_iterations"] = args.prune_iterations
    cfg = robustkd_config(options)
    if cfg.prune != "anp":
        raise SystemExit(f"anp_detection_probe: preset {cfg.extra['preset']!r} does not prune "
                         "by ANP")
    device = resolve_device(args.device)
    parent = load_teacher(teacher_dir, device, "--teacher", False)
    splits, clean = run_data(parent.meta, args.data_root, args.clean_fraction, args.clean_seed)
    ctx = DefenseContext(clean=clean, mean=splits.mean, std=splits.std,
                         augment=splits.augment, device=device, seed=args.seed, progress=False)
    _, report = defend_teacher(cfg.prune, parent.model, ctx, cfg.prune_options())
    trigger = parent.meta.get("trigger") or {}
    attack = parent.meta.get("attack") or {}
    return {"teacher": Path(teacher_dir).name, "attack": attack.get("name", "none"),
            "target_for_reading": trigger.get("target"),
            "detected": report["perturbed_flip_class"], "flips": report["perturbed_flips"],
            "pruned": report["pruned"], "channels": report["channels"],
            "iterations": report["settings"]["iterations"], "clean_images": len(clean),
            "seconds": round(report["seconds"], 1), "seed": args.seed,
            "device": describe_device(device), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", action="append", required=True, help="a teacher run (repeatable)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clean-fraction", type=float, default=BENCH.clean_fraction)
    p.add_argument("--clean-seed", type=int, default=BENCH.clean_seed)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="anp-prune", help="RobustKD preset with an ANP pruning")
    p.add_argument("--prune-iterations", type=int, default=None)
    p.add_argument("--save", default=None, help="append each line to this JSONL file too")
    args = p.parse_args()
    for teacher in args.teacher:
        line = probe(teacher, args)
        print(json.dumps(line), flush=True)
        if args.save:
            with Path(args.save).open("a") as f:  # one whole line per finished teacher
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
