"""Numbers of one table cell: a metric in percent over its seeds, mean and 95% interval,
and the seed-paired removal rate against FKD (shared by every report)."""

from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Any

# two-sided 95% Student-t quantiles by degrees of freedom (1..30), then the normal value
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the 95% t-interval half-width (``None`` for a single value)."""
    if len(values) < 2:
        return values[0], None
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return mean(values), t * stdev(values) / math.sqrt(len(values))


def metric_percent(record: dict[str, Any] | None, name: str) -> float | None:
    """A record's metric in percent (``None`` when the run or the metric is missing)."""
    if record is None:
        return None
    value = record.get("metrics", {}).get(name)
    return None if value is None else 100.0 * value


def format_cell(values: list[float], paper: float | None = None) -> str:
    """``mean ± half-width`` of the seeds, with the paper's number in brackets."""
    if not values:
        text = "–"
    else:
        m, h = interval(values)
        text = f"{m:.1f}" if h is None else f"{m:.1f} ± {h:.1f}"
    return text if paper is None else f"{text} [{paper:.2f}]"


def cell_values(records: dict[str, dict[str, Any]], runs: list[str], metric: str) -> list[float]:
    """One value per finished run of a cell (percent)."""
    return [v for r in runs if (v := metric_percent(records.get(r), metric)) is not None]


def removal_rates(records, fkd_runs: list[str], rkd_runs: list[str],
             seed_of: dict[str, int]) -> list[float]:
    """Per-seed ``1 - ASR(RobustKD)/ASR(FKD)`` (in %), for seeds where FKD's ASR > 0."""
    fkd_by_seed = {seed_of[f]: f for f in fkd_runs}
    out = []
    for r in rkd_runs:
        f = fkd_by_seed.get(seed_of[r])
        fa, ra = metric_percent(records.get(f), "asr"), metric_percent(records.get(r), "asr")
        if fa and ra is not None:
            out.append(100.0 * (1 - ra / fa))
    return out
