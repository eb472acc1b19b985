"""Run what a study needs, skip what is done, survive being killed at any point.

Layout of an output directory ``OUT``::

    OUT/runs/<node id>/      one run directory per node (record.json, model, checkpoints)
    OUT/runs/<node id>/node.json   the node's identity, written before the run starts
    OUT/records.jsonl        one JSON line per finished run: node + its record
    OUT/studies/<name>.json  where each run's numbers go in the table/figure

A run is finished when its ``record.json`` exists (the API writes it atomically as the last
step) beside a ``node.json`` with the same id. An interrupted run is resumed from its last
finished epoch (the API's ``resume``). Every file is written atomically, so a kill leaves
either the old or the new version. ``--shard i/n`` splits the final runs of a grid over
machines; a shard also computes the (shared) teachers it needs, guarded by a lock file so
shards on a shared filesystem wait for each other instead of computing a teacher twice.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError
from robustkd.experiments.plan import Cell, RunNode
from robustkd.io import RECORD_FILE, atomic_write, read_json, write_json

NODE_FILE = "node.json"
LOCK_FILE = "run.lock"
RECORDS_FILE = "records.jsonl"
# beside node.json and record.json: a run put back from a results file without its weights
# (benchmarks/bench_store.py); finished for reports, recomputed when another run reads it
RECORD_ONLY_FILE = "record_only"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard | None:
        if not text:
            return None
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
        if not 0 <= i < n:
            raise ConfigError(f"--shard {text}: need 0 <= i < n")
        return cls(i, n)

    def owns(self, node: RunNode) -> bool:
        return int(node.digest, 16) % self.count == self.index


def ordered_nodes(cells: Iterable[Cell], shard: Shard | None = None) -> list[RunNode]:
    """The runs behind ``cells``, parents first; with a shard, only its final runs and
    their ancestors."""
    leaves = {c.node.id: c.node for c in cells}
    if shard is not None:
        leaves = {k: n for k, n in leaves.items() if shard.owns(n)}
    order: list[RunNode] = []
    seen: set[str] = set()

    def visit(node: RunNode) -> None:
        if node.id in seen:
            return
        for parent in node.parents.values():
            visit(parent)
        seen.add(node.id)
        order.append(node)

    for node in leaves.values():
        visit(node)
    return order


def run_dir(out: Path, node: RunNode) -> Path:
    return out / "runs" / node.id


def is_record_only(out: Path, node: RunNode) -> bool:
    """Whether a finished run holds its record but no weights (restored from results)."""
    return (run_dir(out, node) / RECORD_ONLY_FILE).exists()


def is_finished(out: Path, node: RunNode) -> bool:
    d = run_dir(out, node)
    if not (d / RECORD_FILE).exists() or not (d / NODE_FILE).exists():
        return False
    try:
        return read_json(d / NODE_FILE).get("id") == node.id
    except (OSError, ValueError):
        return False


def _call(node: RunNode, out: Path, data_root: str | None, device: str,
          progress: bool) -> dict[str, Any]:
    """One API call for one node (imported lazily: planning needs no torch)."""
    from robustkd import api

    target = run_dir(out, node)
    parents = {k: str(run_dir(out, p)) for k, p in node.parents.items()}
    common = {"device": device, "out": target}
    if node.kind == "scan":
        return api.scan(**parents, **node.params, **common)
    if node.kind == "evaluate":
        return api.evaluate(**parents, **node.params, **common)
    common.update(progress=progress, resume=True)
    if node.kind == "train":
        return api.train(**node.params, data_root=data_root, **common)
    if node.kind == "attack":
        scratch = "dataset" in node.params  # poisoned from scratch: no teacher to read it from
        return api.attack(**parents, **node.params, **common,
                          **({"data_root": data_root} if scratch else {}))
    if node.kind == "distill":
        return api.distill(**parents, **node.params, **common)
    if node.kind == "defend":
        return api.defend(**parents, **node.params, **common)
    raise ConfigError(f"unknown run kind {node.kind!r}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(path: Path, wait: Callable[[str], None]) -> None:
    """Create ``path`` exclusively; a lock left by a dead process on this host is taken
    over, one held elsewhere is waited for."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its process was killed
                continue
            wait(f"{path.parent.name} is being computed by {holder}; waiting")
            time.sleep(30)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def write_records(out: Path) -> Path:
    """Rewrite ``records.jsonl`` (atomically) from every finished run directory."""
    lines = []
    for d in sorted((out / "runs").glob("*")):
        if (d / RECORD_FILE).exists() and (d / NODE_FILE).exists():
            node = read_json(d / NODE_FILE)
            lines.append(json.dumps({"node": node, "record": read_json(d / RECORD_FILE)},
                                    sort_keys=True, default=str))
    text = "".join(line + "\n" for line in lines)
    return atomic_write(out / RECORDS_FILE, lambda tmp: tmp.write_text(text))


def write_layout(out: Path, study: str, cells: list[Cell], meta: dict[str, Any]) -> Path:
    """``studies/<study>.json``: which run fills which cell (merged with earlier calls, so
    several --dataset invocations build one table). A cell planned again takes the new
    plan's run: a redefined scale or preset must not leave its old run in the cell as an
    extra "seed"."""
    path = out / "studies" / f"{study}.json"
    old = read_json(path) if path.exists() else {"cells": []}
    rows = {cell_position(c): c for c in old["cells"]}
    for c in cells:
        item = layout_cell(c)
        rows[cell_position(item)] = item
    return write_json(path, {"study": study, **meta, "cells": list(rows.values())})


def layout_cell(c: Cell) -> dict[str, Any]:
    """A planned cell as stored in ``studies/<study>.json``."""
    return {"dataset": c.dataset, "paper_dataset": c.paper_dataset,
            "paper_pair": c.paper_pair, "pair": c.pair, "column": c.column,
            "seed": c.seed, "run": c.node.id}


def cell_position(c: dict[str, Any]) -> str:
    """Where a stored cell sits in its table (everything but the run filling it)."""
    return json.dumps({k: v for k, v in c.items() if k != "run"}, sort_keys=True)


def run_nodes(nodes: list[RunNode], out: str | Path, *, data_root: str | None = None,
              device: str = "auto", progress: bool = True, max_runs: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, int]:
    """Compute every unfinished node in order; returns counts of run/skipped nodes."""
    out = Path(out)
    counts = {"run": 0, "skipped": 0, "total": len(nodes)}
    for i, node in enumerate(nodes, 1):
        if is_finished(out, node):
            counts["skipped"] += 1
            log(f"[{i}/{len(nodes)}] done already: {node.id}")
            continue
        if max_runs is not None and counts["run"] >= max_runs:
            log(f"stopping after {max_runs} runs (max_runs)")
            break
        _restore_weights(node, out, data_root, device, progress, log)
        if _run_one(node, out, data_root, device, progress, log, f"[{i}/{len(nodes)}] "):
            counts["run"] += 1
        else:
            counts["skipped"] += 1
        write_records(out)
    write_records(out)
    return counts


def _restore_weights(node: RunNode, out: Path, data_root: str | None, device: str,
                     progress: bool, log: Callable[[str], None]) -> None:
    """Recompute the parents of ``node`` that are finished as records only (and theirs in
    turn): ``node`` reads their weights."""
    for parent in node.parents.values():
        if not (is_finished(out, parent) and is_record_only(out, parent)):
            continue
        _restore_weights(parent, out, data_root, device, progress, log)
        log(f"recomputing {parent.id}: restored as a record only, and {node.id} reads its "
            "weights")
        d = run_dir(out, parent)
        (d / RECORD_FILE).unlink(missing_ok=True)  # unfinished first, then the rest
        for f in d.iterdir():
            if f.name not in (NODE_FILE, LOCK_FILE):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        _run_one(parent, out, data_root, device, progress, log, "")


def _run_one(node: RunNode, out: Path, data_root: str | None, device: str, progress: bool,
             log: Callable[[str], None], prefix: str) -> bool:
    """Compute one node under its lock; False when another shard finished it meanwhile."""
    where = run_dir(out, node)
    where.mkdir(parents=True, exist_ok=True)
    lock = where / LOCK_FILE
    _take_lock(lock, log)
    try:
        if is_finished(out, node):  # another shard finished it while we waited
            return False
        write_json(where / NODE_FILE, node.spec())
        log(f"{prefix}{node.kind}: {node.id}")
        started = time.perf_counter()
        _call(node, out, data_root, device, progress)
        log(f"{prefix}finished {node.id} in {time.perf_counter() - started:.0f} s")
        return True
    finally:
        lock.unlink(missing_ok=True)
