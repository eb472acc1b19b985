"""Compare defence settings on a validation split carved from the defender's clean data.

One benchmark student (the plan's FKD cell of a teacher: same student, data, schedule and
seed) is trained with another method or RobustKD preset on the defender's images minus a
per-class validation share (``--clean-val``), and measured on that share only: the test set
is not read, so settings can be chosen before the benchmark's test cells are run.

    OMP_NUM_THREADS=1 python benchmarks/validation_probe.py --bench runs/bench \\
        --teacher sig-scratch --method robustkd --preset student-uat --out runs/val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from robustkd import api
from robustkd.experiments import plan
from robustkd.experiments.runner import run_dir


def overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs, each value read as YAML (numbers, booleans, words)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True, help="the benchmark's run store (its teachers)")
    p.add_argument("--teacher", required=True, help="benchmark teacher, e.g. sig-scratch")
    p.add_argument("--method", default="fkd")
    p.add_argument("--preset", default=None, help="RobustKD preset (method robustkd)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="RobustKD setting over the preset (repeatable)")
    p.add_argument("--defense", default=None, help="teacher defence first (e.g. anp)")
    p.add_argument("--defense-set", action="append", default=[], metavar="KEY=VALUE",
                   help="setting of that defence (repeatable)")
    p.add_argument("--method-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the distillation method (e.g. logit_weight=1 for fkd)")
    p.add_argument("--layers", default=None, metavar="NAMES",
                   help="comma-separated layers distilled, the same names in teacher and "
                        "student (default: the models' own distillation layers)")
    p.add_argument("--clean-val", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="mini")
    p.add_argument("--out", required=True, help="folder of the probe's runs")
    args = p.parse_args()
    cells = plan(["benchmark"], args.scale, seeds=args.seed + 1)["benchmark"]
    node = next(c.node for c in cells
                if c.column == f"fkd/{args.teacher}" and c.seed == args.seed)
    params = {**node.params, "method": args.method, "clean_val": args.clean_val}
    name = args.method
    if args.method == "robustkd":
        params["robustkd"] = {"preset": args.preset or "improved", **overrides(args.set)}
        name = "-".join([params["robustkd"]["preset"], *args.set]).replace("=", "")
    if args.defense:
        params.update(defense=args.defense, defense_options=overrides(args.defense_set))
        name = "-".join([args.defense, *args.defense_set, name]).replace("=", "")
    if args.method_set:
        params["options"] = overrides(args.method_set)
        name = "-".join([name, *args.method_set]).replace("=", "")
    if args.layers:
        layers = [n.strip() for n in args.layers.split(",") if n.strip()]
        params.update(teacher_layers=layers, student_layers=layers)
        name = f"{name}-layers-{'+'.join(layers)}"
    out = Path(args.out) / f"{args.teacher}-{name}-s{args.seed}"
    rec = api.distill(teacher=run_dir(Path(args.bench), node.parents["teacher"]), **params,
                      device="cpu", progress=False, resume=True, out=str(out))
    print(json.dumps({"teacher": args.teacher, "method": args.method, "name": name,
                      "seed": args.seed, "split": f"validation {args.clean_val}",
                      **rec["metrics"], "seconds": rec["seconds"], "run": str(out)}),
          flush=True)


if __name__ == "__main__":
    main()
