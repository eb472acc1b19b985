"""The defence benchmark's report: one table and one PNG per backdoored teacher.

Rendered from records only, like every report. Each teacher's heading checks the
benchmark's admission criteria (a real backdoor that crosses distillation); each table lists
the methods with ACC, ASR, R-ACC, the removal rate vs FKD (paired by seed) and wall time,
as mean ± 95% t half-width over seeds.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from robustkd.errors import ConfigError
from robustkd.experiments.benchmark import BENCH_METHODS, BENCH_TEACHERS, bench_recipe
from robustkd.experiments.cells import cell_values, format_cell, interval, removal_rates
from robustkd.experiments.scales import get_scale
from robustkd.plotting import pyplot, save_png

# (criterion, test) on the teacher's numbers in %; None where a number is missing
CRITERIA = (
    ("teacher ASR ≥ 90", lambda n: n["teacher_asr"] >= 90),
    ("teacher ACC ≥ clean − 3", lambda n: n["teacher_acc"] >= n["clean_acc"] - 3),
    ("clean teacher ASR ≤ 10", lambda n: n["floor"] <= 10),
    ("FKD ASR ≥ 40", lambda n: n["fkd"] >= 40),
    ("CE-only ASR ≤ 10", lambda n: n["ce"] <= 10),
)
DEEP = ("fine-tune + FKD ASR ≥ 30 (deep)", lambda n: n["finetune"] >= 30)


def _columns(layout: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """teacher name -> column (method or ``teacher``/``floor``) -> run ids."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in layout["cells"]:
        kind, teacher = c["column"].split("/", 1)
        out[teacher][kind].append(c["run"])
    return out


def _seeds(layout: dict[str, Any]) -> dict[str, int]:
    return {c["run"]: c["seed"] for c in layout["cells"]}


def _mean(records, runs: list[str], metric: str) -> float | None:
    vals = cell_values(records, runs, metric)
    return mean(vals) if vals else None


def teacher_numbers(records, cols: dict[str, list[str]], clean_runs: list[str]
                    ) -> dict[str, float | None]:
    """The numbers the admission criteria test, in %."""
    return {"teacher_acc": _mean(records, cols.get("teacher", []), "acc"),
            "teacher_asr": _mean(records, cols.get("teacher", []), "asr"),
            "clean_acc": _mean(records, clean_runs, "acc"),
            "floor": _mean(records, cols.get("floor", []), "asr"),
            "fkd": _mean(records, cols.get("fkd", []), "asr"),
            "ce": _mean(records, cols.get("ce", []), "asr"),
            "finetune": _mean(records, cols.get("finetune", []), "asr")}


def criteria_line(numbers: dict[str, float | None]) -> str:
    """Each criterion as ✓ / ✗ / ? (not measured yet)."""
    parts = []
    for text, test in (*CRITERIA, DEEP):
        try:
            mark = "✓" if test(numbers) else "✗"
        except TypeError:  # a number is still missing
            mark = "?"
        parts.append(f"{mark} {text}")
    return "; ".join(parts)


def run_seconds(record: dict) -> float:
    """A run's wall time; a cell that cleaned another cell's student (``robustkd defend``,
    e.g. the student's pruning) counts that student's distillation too."""
    return record["seconds"] + (record.get("parent_seconds") or 0.0)


def _seconds(records, runs: list[str]) -> str:
    secs = [run_seconds(records[r]) for r in runs if r in records]
    if not secs:
        return "–"
    m, h = interval(secs)
    return f"{m:.0f}" if h is None else f"{m:.0f} ± {h:.0f}"


def _precisions(records, runs: list[str]) -> set[str]:
    """The arithmetic the finished runs recorded (``unrecorded`` for records older than the
    field)."""
    return {records[r].get("precision") or "unrecorded" for r in runs if r in records}


def _time_ratio(records, runs: list[str], fkd_runs: list[str]) -> str:
    """Mean seconds of the method over the FKD student's mean seconds (issue 15's budget is
    1.5x FKD's); none where the runs used different arithmetic (bf16 and fp32 steps differ
    about twofold in speed)."""
    secs = [run_seconds(records[r]) for r in runs if r in records]
    base = [run_seconds(records[r]) for r in fkd_runs if r in records]
    if not secs or not base:
        return "–"
    mixed = _precisions(records, runs) | _precisions(records, fkd_runs)
    if len(mixed) > 1:
        return f"– ({' vs '.join(sorted(mixed))})"
    return f"{(sum(secs) / len(secs)) / (sum(base) / len(base)):.2f}"


def _defender_data(scale_name: str | None) -> str:
    try:
        sizes = get_scale(str(scale_name)).benchmark
    except ConfigError:
        sizes = None
    if sizes is None:
        return ""
    return (f"Defender's clean data: a per-class {sizes.clean_fraction:.0%} subset of the "
            f"{sizes.dataset} training set (subset seed {sizes.clean_seed}), the same images "
            f"for every method and seed. Teachers {sizes.teacher_model} ({sizes.teacher_epochs}"
            f" epochs unless stated), students {sizes.student_model} "
            f"({sizes.student_epochs} epochs).")


def benchmark_markdown(layout: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    cols = _columns(layout)
    seed_of = _seeds(layout)
    clean_runs = cols.get("clean", {}).get("teacher", [])
    lines = [_defender_data(layout.get("scale")), "",
             f"Clean teacher: ACC {format_cell(cell_values(records, clean_runs, 'acc'))}.", ""]
    order = [t.name for t in BENCH_TEACHERS] + sorted(set(cols) - {t.name for t in
                                                                  BENCH_TEACHERS} - {"clean"})
    for name in [t for t in order if t in cols]:
        c = cols[name]
        nums = teacher_numbers(records, c, clean_runs)
        t_acc, t_asr = (format_cell(cell_values(records, c.get("teacher", []), m))
                        for m in ("acc", "asr"))
        floor = format_cell(cell_values(records, c.get("floor", []), "asr"))
        epochs = sorted({records[r]["config"].get("epochs") for r in c.get("teacher", [])
                         if r in records and "config" in records[r]} - {None})
        trained = f" ({', '.join(map(str, epochs))} epochs)" if epochs else ""
        lines += [f"### {name}", "",
                  f"Teacher{trained} ACC {t_acc}, ASR {t_asr}; the clean teacher under this "
                  f"trigger (floor): ASR {floor}.", "",
                  f"Criteria: {criteria_line(nums)}.", "",
                  "| method | seeds | ACC % | ASR % | R-ACC % | removal vs FKD % | seconds | "
                  "× FKD time |", "|---|---|---|---|---|---|---|---|"]
        methods = [m for m in BENCH_METHODS if m in c] + sorted(set(c) - set(BENCH_METHODS)
                                                               - {"teacher", "floor"})
        shown: dict[tuple[str, ...], str] = {}
        for m in methods:
            runs = [r for r in c[m] if r in records]
            label = bench_recipe(m).label if m in BENCH_METHODS else m
            if tuple(c[m]) in shown:  # a column computed as another (benchmark.twin)
                label += f" (the same runs as {shown[tuple(c[m])]})"
            shown.setdefault(tuple(c[m]), label)
            removal = "–" if m == "fkd" else format_cell(
                removal_rates(records, c.get("fkd", []), runs, seed_of))
            lines.append(f"| {label} | {len(runs)}/{len(c[m])} | "
                         f"{format_cell(cell_values(records, runs, 'acc'))} | "
                         f"{format_cell(cell_values(records, runs, 'asr'))} | "
                         f"{format_cell(cell_values(records, runs, 'racc'))} | {removal} | "
                         f"{_seconds(records, runs)} | "
                         f"{_time_ratio(records, runs, c.get('fkd', []))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_benchmark(out: Path, layout: dict[str, Any], records: dict[str, dict[str, Any]]
                   ) -> list[Path]:
    """``benchmark-<teacher>.png``: ASR and ACC per method with 95% interval bars (seeds
    in the label; a single seed drawn paler, without bars), the clean teacher's ASR under
    the trigger as a dashed line."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for name, c in sorted(_columns(layout).items()):
        methods = [m for m in BENCH_METHODS if any(r in records for r in c.get(m, []))]
        if not methods:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric in zip(axes, ("asr", "acc"), strict=True):
            values = [cell_values(records, c[m], metric) for m in methods]
            stats = [interval(v) if v else (0.0, None) for v in values]
            # one seed has no interval: a paler bar without error caps, n in the label
            ax.bar(range(len(methods)), [s[0] for s in stats],
                   color=["tab:blue" if len(v) > 1 else "lightsteelblue" for v in values])
            spread = [(i, s) for i, s in enumerate(stats) if s[1] is not None]
            if spread:
                ax.errorbar([i for i, _ in spread], [s[0] for _, s in spread],
                            yerr=[s[1] for _, s in spread], fmt="none", capsize=3,
                            ecolor="black")
            ax.set_xticks(range(len(methods)),
                          [f"{m} (n={len(v)})" for m, v in zip(methods, values, strict=True)],
                          rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(f"{metric.upper()} %")
            ax.grid(axis="y", alpha=0.3)
            if metric == "asr" and (floor := cell_values(records, c.get("floor", []), "asr")):
                ax.axhline(mean(floor), ls="--", color="tab:red", label="clean teacher")
                ax.legend(fontsize=7)
        fig.suptitle(f"benchmark: {name} (mean, 95% interval over seeds)", fontsize=9)
        fig.tight_layout()
        paths.append(save_png(fig, out / f"benchmark-{name}.png"))
    return paths
