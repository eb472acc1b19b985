"""bf16 autocast vs fp32 on the CPU: the same benchmark student, several seeds, both ways.

Plans the benchmark, takes one student cell (``--column fkd/badnets-scratch``), and runs it
with ``amp`` off into ``OUT/fp32-s<seed>`` (the bf16 runs are the benchmark's own cells,
read from ``--bench``); prints one JSON line per seed with ACC/ASR/R-ACC and seconds of
both, so bf16 can be judged against seed noise.

    OMP_NUM_THREADS=1 python benchmarks/amp_check.py --bench runs/bench --out runs/amp \\
        --column fkd/badnets-scratch --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustkd import api
from robustkd.experiments import plan
from robustkd.experiments.runner import is_finished, run_dir
from robustkd.io import RECORD_FILE, read_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True, help="the benchmark's OUT directory")
    p.add_argument("--out", required=True)
    p.add_argument("--column", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--scale", default="mini")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = plan(["benchmark"], args.scale, seeds=max(seeds) + 1)["benchmark"]
    bench = Path(args.bench)
    for seed in seeds:
        cell = next(c for c in cells if c.column == args.column and c.seed == seed)
        node = cell.node
        teacher = run_dir(bench, node.parents["teacher"])
        target = Path(args.out) / f"fp32-s{seed}"
        if not (target / RECORD_FILE).exists():
            api.distill(teacher=teacher, **node.params, amp=False, device="cpu",
                        progress=False, resume=True, out=target)
        fp32 = read_json(target / RECORD_FILE)
        bf16 = (read_json(run_dir(bench, node) / RECORD_FILE)
                if is_finished(bench, node) else None)
        row = {"column": args.column, "seed": seed,
               "fp32": {**fp32["metrics"], "seconds": fp32["seconds"]},
               "bf16": None if bf16 is None else {**bf16["metrics"],
                                                  "seconds": bf16["seconds"]}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
