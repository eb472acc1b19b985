"""Collect validation-probe runs (benchmarks/validation_probe.py) into one table.

    python benchmarks/validation_table.py --runs runs/val \\
        --save benchmarks/results/validation-2026-12-02
writes ``probes.jsonl`` (one line per finished run) and ``table.md`` there and prints the
table: per teacher and setting, validation ACC / ASR / R-ACC (%) and seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustkd.io import RECORD_FILE, atomic_write, read_json


def rows(runs: Path) -> list[dict]:
    out = []
    for rec_file in sorted(runs.glob(f"*/{RECORD_FILE}")):
        rec = read_json(rec_file)
        cfg = rec["config"]
        teacher = Path(cfg["teacher"]).name
        out.append({"run": rec_file.parent.name, "teacher": teacher, "method": cfg["method"],
                    "robustkd": cfg.get("robustkd"), "seed": rec["seed"],
                    "clean_val": cfg.get("clean_val"), "clean_images": rec["clean_images"],
                    **{k: rec["metrics"].get(k) for k in ("acc", "asr", "racc")},
                    "seconds": round(rec["seconds"]), "git_rev": rec.get("git_rev"),
                    "device": rec.get("device")})
    return out


def table(found: list[dict]) -> str:
    lines = ["| run | clean images | val ACC | val ASR | val R-ACC | s |",
             "|---|---|---|---|---|---|"]
    for r in found:
        pct = [f"{100 * r[k]:.1f}" if r[k] is not None else "" for k in ("acc", "asr", "racc")]
        lines.append(f"| {r['run']} | {r['clean_images']} | {' | '.join(pct)} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    found = rows(Path(args.runs))
    text = table(found)
    print(text, end="")
    if args.save:
        save = Path(args.save)
        save.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(r) + "\n" for r in found)
        atomic_write(save / "probes.jsonl", lambda tmp: tmp.write_text(lines))
        atomic_write(save / "table.md", lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
