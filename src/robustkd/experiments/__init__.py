"""The paper's tables and figures as data, a resumable runner and reports.

``reproduce(["table4"], scale="mini", ...)`` plans every run the studies need at that scale
(shared runs once), computes what is missing, and writes ``OUT/report.md`` (+ PNGs) from the
records. ``robustkd reproduce`` is the CLI of the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.experiments.benchmark import plan_benchmark
from robustkd.experiments.plan import Cell, Planner, plan_study
from robustkd.experiments.report import report
from robustkd.experiments.runner import (
    Shard,
    is_finished,
    ordered_nodes,
    run_nodes,
    write_layout,
)
from robustkd.experiments.scales import get_scale
from robustkd.experiments.specs import STUDIES, get_study

__all__ = ["plan", "reproduce", "report", "STUDIES"]


BENCHMARK = "benchmark"


def _names(targets: list[str]) -> list[str]:
    names: list[str] = []
    for t in targets:
        for name in (sorted(STUDIES) if t == "all" else [t]):
            if name != BENCHMARK:
                get_study(name)
            if name not in names:
                names.append(name)
    return names


def plan(targets: list[str], scale: str = "mini", datasets: list[str] | None = None,
         seeds: int = 1, attacks: list[str] | None = None,
         methods: list[str] | None = None) -> dict[str, list[Cell]]:
    """Cells of every named study (``all`` = every table and figure; ``benchmark`` = the
    defence benchmark, whose ``attacks`` filter names its teachers)."""
    sc = get_scale(scale)
    planner = Planner(sc)
    return {name: plan_benchmark(sc, list(range(seeds)), attacks, methods)
            if name == BENCHMARK else
            plan_study(get_study(name), sc, list(datasets or sc.default_datasets),
                       list(range(seeds)), attacks, methods, planner)
            for name in _names(targets)}


def reproduce(targets: list[str], *, scale: str = "mini", out: str | Path = "runs/reproduce",
              data_root: str | None = None, datasets: list[str] | None = None,
              seeds: int = 1, attacks: list[str] | None = None,
              methods: list[str] | None = None, shard: str | None = None,
              device: str = "auto", progress: bool = True, dry_run: bool = False,
              max_runs: int | None = None, log=print) -> dict[str, Any]:
    """Run what the studies need (skipping finished runs) and write the report."""
    out = Path(out)
    cells = plan(targets, scale, datasets, seeds, attacks, methods)
    nodes = ordered_nodes([c for cs in cells.values() for c in cs], Shard.parse(shard))
    if dry_run:  # what a run would do now: OUT's finished runs are skipped, not redone
        finished = 0
        for node in nodes:
            done = is_finished(out, node)
            finished += done
            log(f"{'done' if done else 'to run':6s} {node.kind:8s} {node.id}")
        log(f"{len(nodes) - finished} to run, {finished} finished in {out}")
        return {"runs": len(nodes), "to_run": len(nodes) - finished, "finished": finished,
                "dry_run": True}
    meta = {"scale": scale, "seeds": list(range(seeds))}
    for name, study_cells in cells.items():
        write_layout(out, name, study_cells, meta)
    counts = run_nodes(nodes, out, data_root=data_root, device=device, progress=progress,
                       max_runs=max_runs, log=log)
    path = report(out, list(cells))
    log(f"report: {path}")
    return {**counts, "report": str(path)}
