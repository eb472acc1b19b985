"""Which cells of the defence benchmark a run store holds: one line per teacher and method,
a mark per seed (``X`` finished, ``.`` not), so a session sees what is left before it
plans its lanes. Reads the plan and the store only; runs nothing.

    python benchmarks/bench_coverage.py --out runs/bench [--seeds 3] [--teachers a,b]
        [--methods fkd,finetune] [--missing]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from robustkd.experiments import plan
from robustkd.experiments.runner import is_finished


def coverage(out: Path, scale: str, seeds: int, teachers: list[str] | None = None,
             methods: list[str] | None = None) -> dict[tuple[str, str], dict[int, bool]]:
    """``(teacher, method) -> {seed: finished}`` for every planned cell of the benchmark."""
    cells = plan(["benchmark"], scale, seeds=seeds, attacks=teachers)["benchmark"]
    grid: dict[tuple[str, str], dict[int, bool]] = defaultdict(dict)
    for c in cells:
        method, _, teacher = c.column.partition("/")
        if methods is None or method in methods:
            grid[(teacher, method)][c.seed] = is_finished(out, c.node)
    return dict(grid)


def lines(grid: dict[tuple[str, str], dict[int, bool]], seeds: int,
          missing_only: bool = False) -> list[str]:
    """One line per teacher and method, teachers in order; ``missing_only`` drops the cells
    every seed of which is finished."""
    width = max((len(m) for _, m in grid), default=0)
    out, last = [], None
    for (teacher, method), done in sorted(grid.items()):
        if missing_only and all(done.get(s, False) for s in range(seeds)):
            continue
        if teacher != last:
            out.append(teacher)
            last = teacher
        marks = "".join("X" if done.get(s) else "." if s in done else " " for s in range(seeds))
        out.append(f"  {method:{width}s} {marks}")
    finished = sum(v for done in grid.values() for v in done.values())
    total = sum(len(done) for done in grid.values())
    out.append(f"{finished} of {total} cells finished")
    return out


def _csv(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the benchmark's run store")
    p.add_argument("--scale", default="mini")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teachers", default=None, help="comma-separated benchmark teachers")
    p.add_argument("--methods", default=None, help="comma-separated columns, e.g. fkd,nad")
    p.add_argument("--missing", action="store_true",
                   help="only the teacher/method pairs with a seed not yet finished")
    args = p.parse_args()
    grid = coverage(Path(args.out), args.scale, args.seeds, _csv(args.teachers),
                    _csv(args.methods))
    print("\n".join(lines(grid, args.seeds, args.missing)))


if __name__ == "__main__":
    main()
