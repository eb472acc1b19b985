"""``results.csv``: every finished run as one row, for a spreadsheet or pandas.

Columns: the run's id, kind, parents, seed, device, arithmetic (bf16/fp32), git revision
and seconds; every metric any run recorded; and every setting (nested ones as
``options.alpha``) whose value differs between the runs - the settings all runs share would
only repeat themselves.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from robustkd.io import atomic_write

FIXED = ("id", "kind", "parents", "seed", "device", "precision", "git_rev", "seconds")
CSV_FILE = "results.csv"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"options": {"alpha": 0.2}}`` -> ``{"options.alpha": 0.2}``; lists as JSON text."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


def rows(items: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows from ``{"node": …, "record": …}`` items (``records.jsonl`` lines)."""
    table, settings = [], []
    for item in items:
        node, record = item["node"], item["record"]
        row = {"id": node["id"], "kind": node["kind"],
               "parents": ";".join(f"{k}={v}" for k, v in sorted(node["parents"].items())),
               "seed": record.get("seed"), "device": record.get("device"),
               "precision": record.get("precision"), "git_rev": record.get("git_rev"),
               "seconds": record.get("seconds")}
        row.update({f"metric.{k}": v for k, v in record.get("metrics", {}).items()})
        table.append(row)
        settings.append(flatten(node.get("params", {})))
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str)
                                       for s in settings}) > 1]
    for row, s in zip(table, settings, strict=True):
        row.update({f"setting.{k}": s.get(k) for k in varying})
    metrics = sorted({k for r in table for k in r if k.startswith("metric.")})
    return [*FIXED, *metrics, *(f"setting.{k}" for k in varying)], table


def write_results_csv(out: str | Path, items: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``OUT/results.csv`` atomically; returns its path."""
    header, table = rows(items)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    text = buf.getvalue()
    return atomic_write(Path(out) / CSV_FILE, lambda tmp: tmp.write_text(text))
