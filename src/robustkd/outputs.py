"""Where a command writes: checked before any data is loaded or anything is computed.

A finished run is never replaced silently (``--overwrite`` says so explicitly), an
unfinished one is continued only with ``--resume``, a command never writes into the run it
reads, and an ``--out`` that is a file or cannot be written is an error up front rather
than after an hour of training.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustkd import distributed as ddp
from robustkd.errors import ConfigError
from robustkd.io import META_FILE, RECORD_FILE, read_json, write_json

STATE_DIR = "state"
JOB_FILE = "job.json"
# settings that say where or how a run executes, not what it computes: a resumed run may
# change them
RUNTIME_KEYS = frozenset({"resume", "overwrite", "progress", "device", "workers", "out",
                          "data_root", "download", "eval_every", "compile"})


def run_state(path: Path) -> str:
    """``finished``, ``unfinished`` (a checkpoint or resume state, no final record) or
    ``empty`` (nothing of a run: missing, empty, or only a harness's bookkeeping)."""
    if (path / RECORD_FILE).exists():
        return "finished"
    meta = path / META_FILE
    if meta.exists():
        try:
            if json.loads(meta.read_text()).get("complete"):
                return "finished"
        except (OSError, ValueError):
            pass
        return "unfinished"
    return "unfinished" if (path / STATE_DIR).is_dir() else "empty"


def prepare_out(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                inputs: Mapping[str, str | Path | None] | None = None,
                job: Mapping[str, Any] | None = None) -> Path:
    """Check a command's run directory before anything is loaded (nothing is created);
    ``inputs`` maps a flag to a run the command reads; a resumed run's ``job`` (the
    command's settings) must equal the ``job.json`` it was started with. Raises
    :class:`ConfigError` with the one line a user needs."""
    out = Path(out)
    for flag, path in (inputs or {}).items():
        if path is not None and Path(path).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is the {flag} run this command reads; write to "
                              "another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a run directory")
    state = run_state(out) if out.is_dir() else "empty"
    if state == "finished" and not overwrite:
        if resume:
            raise ConfigError(f"--out {out} holds a finished run: nothing to resume (its "
                              f"results are in {out / RECORD_FILE}); --overwrite runs it again")
        raise ConfigError(f"--out {out} holds a finished run; choose another --out, or pass "
                          "--overwrite to replace it")
    if state == "unfinished" and not (resume or overwrite):
        raise ConfigError(f"--out {out} holds an unfinished run: --resume continues it, "
                          "--overwrite starts it again")
    _check_writable(out)
    if ddp.is_main():
        if overwrite and state != "empty" and not resume:
            _clear_run(out)
        if job is not None and resume and state == "unfinished":
            _check_resumed_job(out / JOB_FILE, job)
    return out


def _check_writable(out: Path) -> None:
    """``out`` can be created and written (checked without creating it: a command that
    fails before its first result leaves nothing behind)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {probe} is not writable")


def _saved_form(job: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(job), default=str))  # tuples as lists, Paths as text


def _check_resumed_job(path: Path, job: Mapping[str, Any]) -> None:
    """A resumed run continues the saved job: a setting that changed is refused, naming
    it (the record would otherwise claim settings the earlier epochs never used)."""
    diff = changed_settings(path, job)
    if diff:
        raise ConfigError(f"--resume continues {path.parent} as it was started; these "
                          f"settings differ: {diff} (repeat them, or --overwrite)")


def changed_settings(path: Path, job: Mapping[str, Any]) -> str:
    """``"key saved -> new; ..."`` for the settings of ``job`` that differ from the job saved
    at ``path`` ("" when none differ or nothing was saved). A setting left to its default
    (None), or one the saved job does not record, takes the saved run's value."""
    if not path.exists():
        return ""
    saved, new = read_json(path), _saved_form(job)
    changed = sorted(k for k in saved
                     if k not in RUNTIME_KEYS and new.get(k) is not None and saved[k] != new[k])
    return "; ".join(f"{k} {saved.get(k)!r} -> {new.get(k)!r}" for k in changed)


def write_job(out: str | Path, job: Mapping[str, Any]) -> None:
    """Save a run's settings beside it once its inputs have loaded (what a later --resume
    is compared with); a resumed run keeps the job it was started with."""
    path = Path(out) / JOB_FILE
    if not path.exists():
        write_json(path, _saved_form(job))


def earlier_seconds(out: str | Path, resume: bool) -> float:
    """Wall seconds the interrupted run in ``out`` had already spent (0 for a new run), so
    a resumed run's record reports the total."""
    meta = Path(out) / META_FILE
    if not resume or not meta.exists():
        return 0.0
    try:
        return float(json.loads(meta.read_text()).get("elapsed_seconds") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


def finish_run(out: str | Path) -> None:
    """A completed run needs no resume state (twice the model's size): remove it."""
    if ddp.is_main():
        shutil.rmtree(Path(out) / STATE_DIR, ignore_errors=True)


def _clear_run(out: Path) -> None:
    """Remove what would make the replaced run look finished or resumable (every other
    file is written again by the new run)."""
    for name in (RECORD_FILE, META_FILE, JOB_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
