"""Run chosen nodes of the defence benchmark in this process (one CPU lane).

``robustkd reproduce benchmark`` runs every node parents-first; on a 2-core machine two
lanes (one thread each) run disjoint node lists at once. A lane names nodes by a prefix of
their column (``teacher/ckd-scratch``, ``fkd/``; a trailing ``$`` asks for that column
exactly, so ``fkd/ckd-scratch$`` leaves out ``fkd/ckd-scratch-long``) and skips nodes
already finished.

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
from robustkd.experiments.runner import is_finished, run_dir, run_nodes, write_layout
from robustkd.io import RECORD_FILE, read_json

GATE_FREE = ("teacher", "floor", "fkd")


def crosses(out: Path, fkd, threshold: float) -> bool:
    """Whether the FKD student is finished and its ASR reaches ``threshold``."""
    if not is_finished(out, fkd):
        return False
    return read_json(run_dir(out, fkd) / RECORD_FILE)["metrics"].get("asr", 0.0) >= threshold


def column_matches(column: str, pattern: str) -> bool:
    """A prefix of the column, or the column itself when the pattern ends in ``$``."""
    return column == pattern[:-1] if pattern.endswith("$") else column.startswith(pattern)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--scale", default="mini")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--columns", required=True,
                   help="comma-separated column prefixes, e.g. teacher/,floor/,fkd/ "
                        "(a trailing $: that column exactly)")
    p.add_argument("--seed-only", type=int, default=None, help="only cells of this seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gate-fkd-asr", type=float, default=None, metavar="F",
                   help="skip a teacher's other students unless its seed-0 FKD student is "
                        "finished with ASR >= F (the admission criterion: it crosses)")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cells = plan(["benchmark"], args.scale, seeds=args.seeds)["benchmark"]
    out = Path(args.out)
    write_layout(out, "benchmark", cells,
                 {"scale": args.scale, "seeds": list(range(args.seeds))})
    prefixes = args.columns.split(",")
    chosen = [c for c in cells if any(column_matches(c.column, x) for x in prefixes)
              and (args.seed_only is None or c.seed == args.seed_only)]
    fkd0 = {c.column.split("/", 1)[1]: c.node for c in cells
            if c.column.startswith("fkd/") and c.seed == 0}
    nodes, seen, gate = [], set(), {}
    in_cells = {c.node.id for c in cells}
    for c in chosen:
        fkd = fkd0.get(c.column.split("/", 1)[1])
        # a parent that is no cell of its own (the teacher-free CE student) runs here first
        for parent in c.node.parents.values():
            if parent.id not in in_cells and parent.id not in seen:
                seen.add(parent.id)
                nodes.append(parent)
                gate[parent.id] = (c.column, fkd)
        if c.node.id not in seen:
            seen.add(c.node.id)
            nodes.append(c.node)
            gate[c.node.id] = (c.column, fkd)
    # the gate reads the FKD students, so they (and teachers, floors) run first
    nodes.sort(key=lambda n: gate[n.id][0].split("/")[0] not in GATE_FREE)
    counts = {"run": 0, "skipped": 0}
    for node in nodes:  # a parent another lane computes is waited for, not recomputed
        missing = [p.id for p in node.parents.values() if not is_finished(out, p)]
        if missing:  # visible, so a lane left waiting for a parent no lane was given shows why
            print(f"{node.id} waits for {', '.join(missing)} (run by another lane, or add its "
                  "column to --columns)", flush=True)
        while not all(is_finished(out, p) for p in node.parents.values()):
            time.sleep(30)
        column, fkd = gate[node.id]
        if (args.gate_fkd_asr is not None and column.split("/")[0] not in GATE_FREE
                and fkd is not None and not crosses(out, fkd, args.gate_fkd_asr)):
            print(f"skipped {node.id}: the FKD student does not cross "
                  f"(ASR < {args.gate_fkd_asr})", flush=True)
            continue
        done = run_nodes([node], out, data_root=args.data_root, device=args.device,
                         progress=False)
        counts = {k: counts[k] + done[k] for k in counts}
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
