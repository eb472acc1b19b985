"""Test helpers for run directories."""

from pathlib import Path

from robustkd.io import read_json, write_json


def as_if_killed(run_dir: Path, **meta) -> None:
    """Make a finished run look interrupted: no final record, no complete mark, and
    ``meta`` written into its ``meta.json`` (e.g. ``epochs_done``)."""
    (run_dir / "record.json").unlink()
    saved = read_json(run_dir / "meta.json")
    saved.pop("complete")
    saved.update(meta)
    write_json(run_dir / "meta.json", saved)
