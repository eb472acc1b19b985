"""Checkpoints and result files: safetensors + JSON, written atomically, loaded safely.

Why: checkpoints come from untrusted model hubs. safetensors cannot execute code on load;
pickle can, so a pickle file is refused unless the user explicitly opts in, and even then
it is opened with ``torch.load(weights_only=True)``.

Under ``torchrun`` only rank 0 writes (every rank holds the same model and results, and
concurrent writers would race on the same run directory): the write helpers below return
the target path without touching the disk on the other ranks.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from robustkd.distributed import is_main
from robustkd.errors import DataError, UnsafeCheckpointError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
RECORD_FILE = "record.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` then rename the temp file over ``path``.

    A crash or a bad input mid-write leaves the previous file untouched, never a torn one.
    Under ``torchrun`` a no-op on every rank but 0 (see the module docstring).
    """
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from others
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Serialise first, then write atomically: an unserialisable object leaves no file.
    Strict JSON: a non-finite number (NaN, inf) is stored as ``null``."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default,
                      allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (what strict JSON allows)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Atomic safetensors write; tensors are made contiguous CPU copies (shared storage is fine)."""
    if not is_main():  # skip the device-to-host copies too
        return Path(path)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # no metadata rather than an empty one: safetensors writes an unreadable header for no
    # tensors with empty metadata (a run with neither masks nor triggers saves none)
    meta = dict(metadata) if metadata else None
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=meta))


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a weights file; safetensors always, pickle formats only with ``allow_pickle``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix in PICKLE_SUFFIXES or not _looks_like_safetensors(path):
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} is a pickle-based checkpoint; unpickling a file from an untrusted "
                "source can run arbitrary code. Convert it to .safetensors, or, if you trust "
                "it, pass --allow-pickle (API: allow_pickle=True) to load it with "
                "torch.load(weights_only=True)."
            )
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(
            obj["state_dict"], Mapping
        ):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            raise UnsafeCheckpointError(
                f"{path} does not hold a state dict of tensors (found {type(obj).__name__})"
            )
        return dict(obj)
    return load_file(str(path), device="cpu")


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length followed by '{'."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, meta: Mapping[str, Any],
                    extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` (weights, plus ``extra.*`` tensors such as a trigger) and
    ``meta.json``."""
    run_dir = Path(run_dir)
    tensors = dict(model.state_dict())
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value
    save_tensors(run_dir / WEIGHTS_FILE, tensors)
    write_json(run_dir / META_FILE, dict(meta))
    return run_dir


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                  dict[str, torch.Tensor]]:
    """``(model_state, meta, extra_tensors)`` of a run directory written by save_checkpoint."""
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / WEIGHTS_FILE, run_dir / META_FILE
    if not weights.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a robustkd run directory (expected {WEIGHTS_FILE} and {META_FILE}); "
            "pass the --out directory of a previous `robustkd train` or `robustkd attack`"
        )
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise DataError(f"{weights} is damaged or truncated ({str(exc).splitlines()[0]}); "
                        "rerun the command that wrote it, or --resume it") from None
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} does not hold a run's metadata")
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    return state, meta, extra
