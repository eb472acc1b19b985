"""Reports from records only: markdown tables in the paper's layout and PNG figures.

Reads ``OUT/records.jsonl`` (what ran and what it measured) and ``OUT/studies/<name>.json``
(which run fills which cell); nothing is typed by hand. Several seeds give ``mean ± h``
where ``h`` is the half-width of the 95% Student-t interval; the paper's number for the
same cell (where it printed one) follows in brackets.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Set
from pathlib import Path
from statistics import mean
from typing import Any

from robustkd.errors import ConfigError
from robustkd.experiments.bench_report import benchmark_markdown, plot_benchmark
from robustkd.experiments.cells import (
    cell_values,
    format_cell,
    metric_percent,
    removal_rates,
)
from robustkd.experiments.paper import paper_value
from robustkd.experiments.plan import Planner, plan_study
from robustkd.experiments.results_csv import write_results_csv
from robustkd.experiments.runner import RECORDS_FILE, cell_position, layout_cell
from robustkd.experiments.scales import get_scale
from robustkd.experiments.specs import STAND_INS, get_recipe, get_study
from robustkd.io import atomic_write, read_json
from robustkd.plotting import pyplot, save_png


def load_items(out: str | Path) -> list[dict[str, Any]]:
    """The ``{"node", "record"}`` lines of ``records.jsonl`` (a torn last line is ignored)."""
    path = Path(out) / RECORDS_FILE
    items = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            items.append(json.loads(line))
        except ValueError:
            continue
    return items


def load_records(out: str | Path) -> dict[str, dict[str, Any]]:
    """``run id -> record`` from ``records.jsonl``."""
    return {item["node"]["id"]: item["record"] for item in load_items(out)}


STALE_MARK = "†"


def stale_runs(name: str, layout: dict[str, Any]) -> set[str]:
    """Runs in the layout that today's plan would not put there (a scale, preset or pair
    changed since they ran): their numbers are shown, marked, not passed off as current."""
    try:
        scale = get_scale(str(layout.get("scale")))
    except ConfigError:
        return set()
    study = get_study(name)
    columns = {c["column"].split("/")[0] for c in layout["cells"]}
    extra = [m for m in columns if m != "teacher" and study.kind == "table"]
    current: dict[str, str] = {}
    planner = Planner(scale)
    for dataset in sorted({c["dataset"] for c in layout["cells"]}):
        try:
            cells = plan_study(study, scale, [dataset], sorted({c["seed"] for c in
                                                                layout["cells"]}),
                               methods=list(study.methods) + extra or None, planner=planner)
        except ConfigError:  # a dataset this scale no longer knows: nothing current
            continue
        current.update({cell_position(item): item["run"]
                        for item in map(layout_cell, cells)})
    fresh = {c["run"] for c in layout["cells"] if current.get(cell_position(c)) == c["run"]}
    # a run that fills a current cell too (a teacher shared with an old row) is not stale
    return {c["run"] for c in layout["cells"]} - fresh


def _marked(text: str, runs: list[str], stale: Set[str]) -> str:
    return f"{text} {STALE_MARK}" if stale.intersection(runs) else text


def _groups(cells: list[dict[str, Any]]) -> dict[tuple, dict[str, list[str]]]:
    """(dataset, paper dataset, paper pair, pair) -> column -> run ids (one per seed)."""
    rows: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        key = (c["dataset"], c["paper_dataset"], c["paper_pair"], c["pair"])
        rows[key][c["column"]].append(c["run"])
    return rows


def table_markdown(name: str, layout: dict[str, Any], records: dict[str, dict[str, Any]],
                   stale: Set[str] = frozenset()) -> str:
    study = get_study(name)
    attacks = [a for a in study.attacks if any(c["column"] == f"teacher/{a}"
                                               for c in layout["cells"])]
    methods = []
    for c in layout["cells"]:
        head = c["column"].split("/")[0]
        if head not in ("teacher",) and head not in methods:
            methods.append(head)
    header = ["dataset", "teacher → student", "clean teacher ACC"]
    for a in attacks:
        header.append(f"{a} teacher ACC / ASR")
        for m in methods:
            for metric in study.metrics:
                header.append(f"{get_recipe(m).label} {a} {metric.upper()}")
        if "fkd" in methods and study.metrics != ("acc",):
            for m in methods:
                if m.startswith("robustkd"):
                    header.append(f"removal rate {get_recipe(m).label} {a}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seed_of = {c["run"]: c["seed"] for c in layout["cells"]}
    for (ds, pds, ppair, pair), cols in sorted(_groups(layout["cells"]).items()):
        standin = "" if ds == pds else f" (stand-in for {pds})"
        clean = cols.get("teacher/clean", [])
        row = [f"{ds}{standin}", f"{pair} (paper: {ppair})",
               _marked(format_cell(cell_values(records, clean, "acc"),
                            paper_value(name, pds, ppair, "teacher_acc")), clean, stale)]
        for i, a in enumerate(attacks):
            runs = cols.get(f"teacher/{a}", [])
            p_asr = paper_value(name, pds, ppair, "teacher_asr") if i == 0 else None
            acc, asr = (cell_values(records, runs, m) for m in ("acc", "asr"))
            row.append(_marked(f"{format_cell(acc)} / {format_cell(asr, p_asr)}", runs, stale))
            for m in methods:
                for metric in study.metrics:
                    runs = cols.get(f"{m}/{a}", [])
                    paper = paper_value(name, pds, ppair, f"{m}/{a}/{metric}")
                    row.append(_marked(format_cell(cell_values(records, runs, metric), paper), runs,
                                       stale))
            if "fkd" in methods and study.metrics != ("acc",):
                for m in methods:
                    if m.startswith("robustkd"):
                        both = cols.get(f"fkd/{a}", []) + cols.get(f"{m}/{a}", [])
                        rem = removal_rates(records, cols.get(f"fkd/{a}", []),
                                       cols.get(f"{m}/{a}", []), seed_of)
                        row.append(_marked(format_cell(rem), both, stale))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def sweep_markdown(name: str, layout: dict[str, Any], records: dict[str, dict[str, Any]],
                   stale: Set[str] = frozenset()) -> str:
    study = get_study(name)
    values = [str(v) for v in study.sweep_values]
    header = ["dataset / pair", "attack", "FKD ACC / ASR"] + [
        f"{study.sweep_option}={v} ACC / ASR" for v in values]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (ds, _pds, _pp, pair), cols in sorted(_groups(layout["cells"]).items()):
        for a in study.attacks:
            if f"{a}/fkd" not in cols:
                continue
            row = [f"{ds} / {pair}", a]
            for key in ["fkd"] + values:
                runs = cols.get(f"{a}/{key}", [])
                acc, asr = (cell_values(records, runs, m) for m in ("acc", "asr"))
                row.append(_marked(f"{format_cell(acc)} / {format_cell(asr)}", runs, stale))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def scan_markdown(layout: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    lines = ["| dataset / pair | model | layer | mean per-example variance | ratio to clean "
             "[95% bootstrap] | ", "|---|---|---|---|---|"]
    for (ds, _pds, _pp, pair), cols in sorted(_groups(layout["cells"]).items()):
        for col, runs in sorted(cols.items()):
            if not col.startswith("scan/"):
                continue
            for run in runs:
                rec = records.get(run)
                if rec is None:
                    continue
                for layer, st in rec.get("layers", {}).items():
                    ratio = st.get("ratio")
                    ci = st.get("ratio_ci95")
                    rtext = "–" if ratio is None else (
                        f"{ratio:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
                    lines.append(f"| {ds} / {pair} | {col[5:]} | {layer} | "
                                 f"{st['model']['mean']:.4g} | {rtext} |")
    return "\n".join(lines) + "\n"


def _plot_sweep(path: Path, name: str, layout, records, stale: Set[str] = frozenset()
                ) -> Path | None:
    """One line per (dataset, pair, attack) of today's plan; runs marked stale are left
    out of the figure (the table still lists them, marked)."""
    plt = pyplot()
    if plt is None:
        return None
    study = get_study(name)
    values = [str(v) for v in study.sweep_values]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    current = [c for c in layout["cells"] if c["run"] not in stale]
    for (ds, _pds, _pp, pair), cols in sorted(_groups(current).items()):
        for a in study.attacks:
            if not any(cols.get(f"{a}/{v}") for v in values):
                continue
            for ax, metric in zip(axes, ("acc", "asr"), strict=True):
                ys = [cell_values(records, cols.get(f"{a}/{v}", []), metric) for v in values]
                means = [mean(y) if y else float("nan") for y in ys]
                line = ax.plot(range(len(values)), means, marker="o",
                               label=f"{a} RobustKD ({ds}, {pair})")[0]
                fkd = cell_values(records, cols.get(f"{a}/fkd", []), metric)
                if fkd:
                    ax.axhline(mean(fkd), ls="--", color=line.get_color(), label=f"{a} FKD")
    for ax, metric in zip(axes, ("ACC %", "ASR %"), strict=True):
        ax.set_xticks(range(len(values)), values)  # every swept value, measured or not
        ax.set_xlabel(study.sweep_option)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(study.title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def _plot_scan(path: Path, layout, records) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    series: dict[str, dict[str, list[float]]] = {}
    for c in layout["cells"]:
        if c["column"].startswith("scan/") and c["run"] in records:
            series[c["column"][5:]] = records[c["run"]].get("values", {})
    layers = sorted({layer for v in series.values() for layer in v})
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for model, vals in sorted(series.items()):
            if layer in vals:
                ax.hist(vals[layer], bins=25, alpha=0.5, label=model)
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("per-example feature variance")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(get_study("fig2").title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def runs_markdown(layout: dict[str, Any], records: dict[str, dict[str, Any]],
                  stale: Set[str] = frozenset()) -> str:
    """Every run behind the study: its numbers, time, device and revision."""
    lines = ["| run | ACC % | ASR % | seconds | device | git | seed |",
             "|---|---|---|---|---|---|---|"]
    for run in sorted({c["run"] for c in layout["cells"]}):
        rec = records.get(run)
        label = _marked(run, [run], stale)
        if rec is None:
            lines.append(f"| {label} | missing | | | | | |")
            continue
        acc, asr = metric_percent(rec, "acc"), metric_percent(rec, "asr")
        lines.append(f"| {label} | {'–' if acc is None else f'{acc:.2f}'} | "
                     f"{'–' if asr is None else f'{asr:.2f}'} | {rec.get('seconds', 0):.0f} | "
                     f"{rec.get('device', '')} | {str(rec.get('git_rev', ''))[:8]} | "
                     f"{rec.get('seed', '')} |")
    return "\n".join(lines) + "\n"


def _benchmark_section(out: Path, layout: dict[str, Any],
                       records: dict[str, dict[str, Any]]) -> list[str]:

    parts = ["## Defence benchmark: backdoors that cross distillation, every defence", "",
             f"Scale `{layout.get('scale')}`, seeds {layout.get('seeds')}.", "",
             benchmark_markdown(layout, records)]
    parts += [f"![{p.stem}]({p.name})\n" for p in plot_benchmark(out, layout, records)]
    return parts + ["<details><summary>runs</summary>", "", runs_markdown(layout, records),
                    "</details>", ""]


def report(out: str | Path, studies: list[str] | None = None) -> Path:
    """Write ``OUT/report.md`` (+ one PNG per figure study) for the studies laid out in
    ``OUT/studies``, and ``OUT/results.csv`` (one row per run); returns the markdown path."""
    out = Path(out)
    items = load_items(out)
    records = {item["node"]["id"]: item["record"] for item in items}
    write_results_csv(out, items)
    names = studies or sorted(p.stem for p in (out / "studies").glob("*.json"))
    parts = ["# Reproduction report", "",
             f"Generated from `{RECORDS_FILE}` ({len(records)} finished runs). Cells: ours "
             "(mean ± 95% t half-width over seeds when several) [the paper's number]. "
             "Stand-in datasets are named in the first column "
             f"({', '.join(f'{k} for {v}' for k, v in STAND_INS.items())}).", ""]
    for name in names:
        layout_path = out / "studies" / f"{name}.json"
        if not layout_path.exists():
            continue
        layout = read_json(layout_path)
        if name == "benchmark":
            parts += _benchmark_section(out, layout, records)
            continue
        study = get_study(name)
        stale = stale_runs(name, layout)
        parts += [f"## {study.title}", "",
                  f"Scale `{layout.get('scale')}`, seeds {layout.get('seeds')}.", ""]
        if study.kind == "table":
            parts.append(table_markdown(name, layout, records, stale))
        elif study.kind == "sweep":
            parts.append(sweep_markdown(name, layout, records, stale))
            png = _plot_sweep(out / f"{name}.png", name, layout, records, stale)
            if png:
                parts.append(f"![{name}]({png.name})\n")
        else:
            parts.append(scan_markdown(layout, records))
            png = _plot_scan(out / f"{name}.png", layout, records)
            if png:
                parts.append(f"![{name}]({png.name})\n")
        if stale:
            parts.append(f"{STALE_MARK} from a run of an earlier setting (the scale, preset or "
                         f"pair changed since): `robustkd reproduce {name} --scale "
                         f"{layout.get('scale')} ...` with the same datasets replaces it.\n")
        parts += ["<details><summary>runs</summary>", "",
                  runs_markdown(layout, records, stale), "</details>", ""]
    text = "\n".join(parts)
    return atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
