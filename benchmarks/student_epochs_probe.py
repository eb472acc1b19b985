"""Does a backdoor cross FKD once the student trains longer? One benchmark student cell,
rerun with more epochs (everything else as planned) into its own directory.

    OMP_NUM_THREADS=1 python benchmarks/student_epochs_probe.py --bench runs/bench \\
        --column fkd/ckd-scratch --epochs 30 --out runs/probe-ckd-fkd30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustkd import api
from robustkd.experiments import plan
from robustkd.experiments.runner import run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True)
    p.add_argument("--column", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", default="mini")
    args = p.parse_args()
    cells = plan(["benchmark"], args.scale, seeds=args.seed + 1)["benchmark"]
    node = next(c.node for c in cells if c.column == args.column and c.seed == args.seed)
    params = {**node.params, "epochs": args.epochs, "eval_every": max(1, args.epochs // 3)}
    rec = api.distill(teacher=run_dir(Path(args.bench), node.parents["teacher"]), **params,
                      device="cpu", progress=False, resume=True, out=args.out)
    print(json.dumps({"column": args.column, "epochs": args.epochs, **rec["metrics"],
                      "seconds": rec["seconds"],
                      "history": [{k: h.get(k) for k in ("epoch", "test_acc", "test_asr")}
                                  for h in rec["history"] if "test_asr" in h]}), flush=True)


if __name__ == "__main__":
    main()
