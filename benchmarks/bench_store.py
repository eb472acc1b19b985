"""Keep the benchmark's teachers across sessions: copy finished teacher runs out of a run
store into ``benchmarks/results/bench-teachers`` (weights, meta, record, trigger; no
resume state), or back into a run store so the harness sees them finished.

Teachers are the benchmark's fixed inputs and cost ~0.5 CPU-hour each; students and
defences are recomputed from them.

    python benchmarks/bench_store.py save --out runs/bench
    python benchmarks/bench_store.py restore --out runs/bench
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from robustkd.experiments import plan
from robustkd.experiments.runner import is_finished, run_dir

STORE = Path(__file__).resolve().parent / "results" / "bench-teachers"
TEACHER_KINDS = ("train", "attack")
SKIP = ("state", "run.lock")


def teacher_nodes(scale: str) -> list:
    cells = plan(["benchmark"], scale, seeds=1)["benchmark"]
    seen, nodes = set(), []
    for c in cells:
        if c.node.kind in TEACHER_KINDS and c.node.id not in seen:
            seen.add(c.node.id)
            nodes.append(c.node)
    return nodes


def copy_run(src: Path, dst: Path) -> None:
    """Copy into a temporary sibling, then rename: a half-copied run is never seen."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*SKIP))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("--out", required=True, help="the benchmark's run store")
    p.add_argument("--scale", default="mini")
    p.add_argument("--store", default=str(STORE))
    args = p.parse_args()
    out, store = Path(args.out), Path(args.store)
    for node in teacher_nodes(args.scale):
        kept = store / node.id
        if args.action == "save":
            if is_finished(out, node) and not (kept / "record.json").exists():
                copy_run(run_dir(out, node), kept)
                print(f"saved {node.id}")
        elif (kept / "record.json").exists() and not is_finished(out, node):
            run_dir(out, node).parent.mkdir(parents=True, exist_ok=True)
            copy_run(kept, run_dir(out, node))
            print(f"restored {node.id}")


if __name__ == "__main__":
    main()
