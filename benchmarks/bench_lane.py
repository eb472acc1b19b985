"""Run chosen nodes of the defence benchmark in this process (one CPU lane).

``robustkd reproduce benchmark`` runs every node parents-first; on a 2-core machine two
lanes (one thread each) run disjoint node lists at once. A lane names nodes by a prefix of
their column (``teacher/ckd-scratch``, ``fkd/``) and skips nodes already finished.

    OMP_NUM_THREADS=1 python benchmarks/bench_lane.py --out runs/bench \\
        --data-root ../shared/data --columns teacher/clean,teacher/ckd-scratch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robustkd.experiments import plan
from robustkd.experiments.runner import is_finished, run_nodes, write_layout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--scale", default="mini")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--columns", required=True,
                   help="comma-separated column prefixes, e.g. teacher/,floor/,fkd/")
    p.add_argument("--seed-only", type=int, default=None, help="only cells of this seed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cells = plan(["benchmark"], args.scale, seeds=args.seeds)["benchmark"]
    out = Path(args.out)
    write_layout(out, "benchmark", cells,
                 {"scale": args.scale, "seeds": list(range(args.seeds))})
    prefixes = args.columns.split(",")
    chosen = [c for c in cells if any(c.column.startswith(x) for x in prefixes)
              and (args.seed_only is None or c.seed == args.seed_only)]
    nodes, seen = [], set()
    for c in chosen:
        if c.node.id not in seen:
            seen.add(c.node.id)
            nodes.append(c.node)
    counts = {"run": 0, "skipped": 0}
    for node in nodes:  # a parent another lane computes is waited for, not recomputed
        while not all(is_finished(out, p) for p in node.parents.values()):
            time.sleep(30)
        done = run_nodes([node], out, data_root=args.data_root, device=args.device,
                         progress=False)
        counts = {k: counts[k] + done[k] for k in counts}
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
