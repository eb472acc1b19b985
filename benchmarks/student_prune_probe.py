"""What pruning a finished student does: the last step of the ``student-prune`` preset,
applied to a student that plain FKD already distilled (no new distillation).

A student trained by FKD from a backdoored teacher inherits the backdoor; the preset prunes
its BN channels by ANP's criterion on the defender's clean subset. This probe loads a
finished ``distill`` run, prunes a copy of its student with the preset's settings on the
benchmark's defender subset (the run's own, by default), and prints one JSON line per
student: its record's ACC / ASR / R-ACC, the pruned copy's, channels pruned, seconds. The
settings are the preset's, fixed before any run; the test set only measures. With the
run's own seed and defender subset, the pruned copy is the student the preset would have
saved (tests/defenses/test_robustkd_student_prune.py checks it bit for bit).

    OMP_NUM_THREADS=1 python benchmarks/student_prune_probe.py --data-root ../shared/data \\
        --student runs/bench/runs/<fkd student run> --save runs/sp.jsonl
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
from robustkd.io import RECORD_FILE, read_json
from robustkd.runs import load_teacher
from robustkd.utils import describe_device, resolve_device

# the benchmark's defender subset (the default of --clean-fraction/--clean-seed)
BENCH = get_scale("mini").benchmark


def probe(student_dir: str, args: argparse.Namespace) -> dict:
    options = {"preset": args.preset}
    if args.iterations is not None:
        options["prune_student_iterations"] = args.iterations
    cfg = robustkd_config(options)
    if cfg.prune_student == "none":
        raise SystemExit(f"student_prune_probe: preset {args.preset!r} does not prune the "
                         "student")
    device = resolve_device(args.device)
    run = load_teacher(student_dir, device, "--student", False)
    record = read_json(Path(student_dir) / RECORD_FILE)
    seed = record["seed"] if args.seed is None else args.seed
    splits, clean = run_data(run.meta, args.data_root, args.clean_fraction, args.clean_seed)
    ctx = DefenseContext(clean=clean, mean=splits.mean, std=splits.std,
                         augment=splits.augment, device=device, seed=seed,
                         test=splits.test, trigger=run.trigger, target=run.target,
                         progress=False)
    _, report = defend_teacher(cfg.prune_student, run.model, ctx,
                               cfg.prune_student_options())
    return {"student": Path(student_dir).name, "before": record["metrics"],
            "after": report["cleaned_teacher_metrics"], "pruned": report["pruned"],
            "channels": report["channels"], "iterations": report["settings"]["iterations"],
            "clean_images": len(clean), "seconds": round(report["seconds"], 1),
            "seed": seed, "device": describe_device(device),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", action="append", required=True,
                   help="a finished distill run (repeatable)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clean-fraction", type=float, default=BENCH.clean_fraction)
    p.add_argument("--clean-seed", type=int, default=BENCH.clean_seed)
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the mask optimisation (default: the student run's, as the "
                        "student-prune preset would use)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="student-prune")
    p.add_argument("--iterations", type=int, default=None,
                   help="mask batches (default: the preset's)")
    p.add_argument("--save", default=None, help="append each line to this JSONL file too")
    args = p.parse_args()
    for student in args.student:
        line = probe(student, args)
        print(json.dumps(line), flush=True)
        if args.save:
            with Path(args.save).open("a") as f:  # one whole line per finished student
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
