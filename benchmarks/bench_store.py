"""Keep the benchmark's teachers outside a run store: copy finished teacher runs into a
teacher store (weights, meta, record, trigger; no resume state), or back into a run store
so the harness sees them finished.

Teachers are the benchmark's fixed inputs and cost 0.5-3 CPU-hours each (by machine);
students and defences are recomputed from them. Checkpoints stay out of git, so the store
is a folder outside the repository (``--store``, default ``$ROBUSTKD_CACHE_DIR`` or
``~/.cache/robustkd``, then ``bench-teachers``); ``save`` also copies each teacher's small
files (record, meta, trigger PNGs) to ``benchmarks/results/bench-teachers`` as results.
``--partial`` also keeps a teacher that is still training, with its resume state, under
``<store>/partial/``: restored, the runner resumes it from its last finished epoch.

    python benchmarks/bench_store.py save --out runs/bench [--partial]
    python benchmarks/bench_store.py restore --out runs/bench
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from robustkd.experiments import plan
from robustkd.experiments.runner import is_finished, run_dir
from robustkd.io import read_json

STORE = Path(os.environ.get("ROBUSTKD_CACHE_DIR", "~/.cache/robustkd")).expanduser() \
    / "bench-teachers"
RESULTS = Path(__file__).resolve().parent / "results" / "bench-teachers"
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


def copy_run(src: Path, dst: Path, skip: tuple[str, ...] = SKIP) -> None:
    """Copy into a temporary sibling, then rename: a half-copied run is never seen."""
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("--out", required=True, help="the benchmark's run store")
    p.add_argument("--scale", default="mini")
    p.add_argument("--store", default=str(STORE))
    p.add_argument("--partial", action="store_true",
                   help="save: also keep unfinished teachers with their resume state")
    args = p.parse_args()
    out, store = Path(args.out), Path(args.store)
    for node in teacher_nodes(args.scale):
        kept, partial = store / node.id, store / "partial" / node.id
        src = run_dir(out, node)
        if args.action == "save":
            if is_finished(out, node) and not (kept / "record.json").exists():
                copy_run(src, kept)
                copy_run(src, RESULTS / node.id, skip=(*SKIP, "*.safetensors"))
                shutil.rmtree(partial, ignore_errors=True)
                print(f"saved {node.id}")
            elif args.partial and not is_finished(out, node) and (src / "state").is_dir():
                copy_run(src, partial, skip=("run.lock",))
                done = read_json(src / "meta.json").get("epochs_done")
                print(f"saved unfinished {node.id} ({done} epochs done)")
        elif not is_finished(out, node):
            if (kept / "record.json").exists():
                copy_run(kept, src)
                print(f"restored {node.id}")
            elif partial.is_dir():
                copy_run(partial, src)
                print(f"restored unfinished {node.id}: the runner resumes it")


if __name__ == "__main__":
    main()
