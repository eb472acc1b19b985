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

The store folder does not outlive a machine, and a teacher costs hours on a slow CPU, so
``save --compact`` also commits-size copies of the weights to the results folder:
``model.fp16.safetensors`` (floating weights in float16, about 1.4 MB for a WRN-16-2; the
trigger and integer buffers exact) and rounds the run's own weights to the same values, so
the students trained now and those restored later see the same teacher. ``restore`` falls
back to these copies when the store lacks a teacher.

``restore --records FILE`` also puts back the students and evaluations a results folder
recorded (``records.jsonl``): each as a record-only run (``node.json`` + ``record.json``
+ a ``record_only`` marker, no weights), which the harness counts as finished and the
report reads, so a later session adds runs to the same report instead of recomputing them.
A run that reads one's weights (a CE student's evaluations, a student pruned after FKD)
recomputes it first.

    python benchmarks/bench_store.py save --out runs/bench [--partial] [--compact]
    python benchmarks/bench_store.py restore --out runs/bench [--records FILE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from robustkd.experiments import plan
from robustkd.experiments.runner import NODE_FILE, RECORD_ONLY_FILE, is_finished, run_dir
from robustkd.io import RECORD_FILE, WEIGHTS_FILE, read_json, save_tensors, write_json
from robustkd.shipped import SHIPPED_WEIGHTS, to_float16, widen

STORE = Path(os.environ.get("ROBUSTKD_CACHE_DIR", "~/.cache/robustkd")).expanduser() \
    / "bench-teachers"
RESULTS = Path(__file__).resolve().parent / "results" / "bench-teachers"
TEACHER_KINDS = ("train", "attack")
SKIP = ("state", "run.lock")
COMPACT_FILE = SHIPPED_WEIGHTS  # the shipped assets' float16 copy (robustkd.shipped)


def save_compact(src: Path, results: Path) -> None:
    """Write the float16 copy to ``results`` and round ``src``'s weights to it in place."""
    half = to_float16(load_file(str(src / WEIGHTS_FILE)))
    save_tensors(results / COMPACT_FILE, half)
    save_tensors(src / WEIGHTS_FILE, widen(half))


def restore_compact(results: Path, dst: Path) -> None:
    weights = widen(load_file(str(results / COMPACT_FILE)))
    copy_run(results, dst, skip=(*SKIP, COMPACT_FILE),
             complete=lambda tmp: save_tensors(tmp / WEIGHTS_FILE, weights))


def teacher_nodes(scale: str) -> list:
    cells = plan(["benchmark"], scale, seeds=1)["benchmark"]
    seen, nodes = set(), []
    for c in cells:
        if c.node.kind in TEACHER_KINDS and c.node.id not in seen:
            seen.add(c.node.id)
            nodes.append(c.node)
    return nodes


def copy_run(src: Path, dst: Path, skip: tuple[str, ...] = SKIP,
             complete: Callable[[Path], None] | None = None) -> None:
    """Copy into a temporary sibling (``complete`` adds to it), then rename: a half-copied
    run is never seen."""
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    if complete is not None:
        complete(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def restore_records(records: Path, out: Path, scale: str) -> None:
    """Record-only runs for the nodes of the current plan that ``records`` holds and
    ``out`` lacks (a node no longer planned is left out). Each is marked record-only: the
    report reads it, and a run that reads its weights (a CE student's evaluations, a
    student pruned after FKD) recomputes it first (``runner.run_nodes``)."""
    nodes = [c.node for c in plan(["benchmark"], scale, seeds=3)["benchmark"]]
    planned = {n.id for n in nodes} | {p.id for n in nodes for p in n.parents.values()}
    for line in records.read_text().splitlines():
        item = json.loads(line)
        node = item["node"]
        d = out / "runs" / node["id"]
        if node["id"] not in planned or (d / RECORD_FILE).exists():
            continue
        write_json(d / NODE_FILE, node)
        write_json(d / RECORD_ONLY_FILE, {"restored_from": str(records)})
        write_json(d / RECORD_FILE, item["record"])
        print(f"restored the record of {node['id']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("--out", required=True, help="the benchmark's run store")
    p.add_argument("--scale", default="mini")
    p.add_argument("--store", default=str(STORE))
    p.add_argument("--partial", action="store_true",
                   help="save: also keep unfinished teachers with their resume state")
    p.add_argument("--compact", action="store_true",
                   help="save: also write float16 weights to benchmarks/results (and round "
                        "the run's weights to them)")
    p.add_argument("--records", nargs="*", default=[], metavar="FILE",
                   help="restore: also the finished runs these records.jsonl files hold "
                        "(record only, no weights)")
    args = p.parse_args()
    out, store = Path(args.out), Path(args.store)
    for node in teacher_nodes(args.scale):
        kept, partial = store / node.id, store / "partial" / node.id
        src = run_dir(out, node)
        if args.action == "save":
            small = RESULTS / node.id
            if is_finished(out, node) and not (kept / "record.json").exists():
                copy_run(src, small, skip=(*SKIP, "*.safetensors"))
            if (is_finished(out, node) and args.compact
                    and not (small / COMPACT_FILE).exists()):
                save_compact(src, small)  # after the copy above, which replaces the folder
                shutil.rmtree(kept, ignore_errors=True)  # the store copies the rounded weights
                print(f"saved {node.id} as float16 in {small}")
            if is_finished(out, node) and not (kept / "record.json").exists():
                copy_run(src, kept)
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
            elif (RESULTS / node.id / COMPACT_FILE).exists():
                restore_compact(RESULTS / node.id, src)
                print(f"restored {node.id} from its float16 copy")
            elif partial.is_dir():
                copy_run(partial, src)
                print(f"restored unfinished {node.id}: the runner resumes it")
    if args.action == "restore":
        for records in args.records:
            restore_records(Path(records), out, args.scale)


if __name__ == "__main__":
    main()
