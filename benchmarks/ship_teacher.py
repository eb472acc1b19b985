"""Package a finished teacher run as an asset shipped with robustkd (``robustkd.shipped``):
its floating weights in float16 (about 1.4 MB for a WRN-16-2; the trigger and integer
buffers exact) and its ``meta.json`` with a ``shipped`` entry that names the command that
built it and the weights' SHA-256, which :func:`robustkd.shipped.materialise` checks.

    python benchmarks/ship_teacher.py runs/fractals-teacher \\
        --folder blended-stripes-fractals-wrn16_2 --built-by "robustkd attack ..."

An existing asset folder is refused unless ``--overwrite``. Register the folder in
``robustkd.shipped.SHIPPED_TEACHERS`` afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from safetensors.torch import load_file

from robustkd.io import META_FILE, WEIGHTS_FILE, read_json, save_tensors, write_json
from robustkd.runs import is_unfinished
from robustkd.shipped import SHIPPED_WEIGHTS, to_float16

ASSETS = Path(__file__).resolve().parents[1] / "src" / "robustkd" / "assets"


def ship(run: Path, folder: Path, built_by: str, overwrite: bool = False) -> dict:
    """Write the asset; returns its ``shipped`` entry."""
    if not (run / META_FILE).exists() or is_unfinished(read_json(run / META_FILE)):
        raise SystemExit(f"ship_teacher: {run} is not a finished run")
    if folder.exists() and not overwrite:
        raise SystemExit(f"ship_teacher: {folder} exists; pass --overwrite to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / SHIPPED_WEIGHTS, to_float16(load_file(str(run / WEIGHTS_FILE))))
    digest = hashlib.sha256((folder / SHIPPED_WEIGHTS).read_bytes()).hexdigest()
    meta = read_json(run / META_FILE)
    meta["shipped"] = {"built_by": built_by, "run": run.name, "sha256": digest,
                       "weights": "float16 copy of the run's floating weights "
                                  "(benchmarks/ship_teacher.py); trigger and integer "
                                  "buffers exact"}
    write_json(folder / META_FILE, meta)
    return meta["shipped"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the finished teacher run directory")
    p.add_argument("--folder", required=True, help="asset folder name under robustkd/assets")
    p.add_argument("--built-by", required=True, help="the command that built the run")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    shipped = ship(args.run, ASSETS / args.folder, args.built_by, args.overwrite)
    print(f"{ASSETS / args.folder}: sha256 {shipped['sha256']}")


if __name__ == "__main__":
    main()
