"""Decode once: cache decoded ``(train, test)`` datasets as uint8 tensors on disk.

Each entry is a ``safetensors`` file (images and labels of both splits) plus a JSON
sidecar (name, classes, the key material). The file name carries a hash of

* the cache format version and the caller's ``key_parts`` (reader name and version,
  options such as ``image_size``), and
* a fingerprint of every source: absolute path, size and ``mtime_ns`` of a file, or of
  every file below a directory (relative path, size, ``mtime_ns``),

so changing a source or an option selects a different entry. Both files are written to
a temporary name in the cache folder and moved into place with :func:`os.replace`; the
sidecar is written last and records the tensor file's size, so a half-written or
corrupt entry is detected, ignored and rebuilt.

The cache folder is ``$ROBUSTKD_CACHE_DIR`` if set, else ``~/.cache/robustkd``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from robustkd.data.dataset import ImageDataset

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_ENV = "ROBUSTKD_CACHE_DIR"

Splits = tuple[ImageDataset, ImageDataset]


def cache_dir() -> Path:
    """The cache folder (not created)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "robustkd"


def source_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of a source file or directory tree that changes when its content does."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            for f in sorted(filenames):
                st = os.stat(os.path.join(dirpath, f))
                rel = os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/")
                files.append([rel, st.st_size, st.st_mtime_ns])
        return {"path": str(p), "kind": "dir", "files": files}
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(p), "kind": "missing"}


def cache_key(key_parts: dict[str, Any], source_paths: Sequence[str | Path]) -> str:
    """Hex digest naming the cache entry for these options and sources."""
    material = {
        "format": CACHE_FORMAT,
        "parts": key_parts,
        "sources": [source_fingerprint(p) for p in source_paths],
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:40]


def _stem(key_parts: dict[str, Any], key: str) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key_parts.get("name", "data")))[:40]
    return f"{label}-{key}"


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _load(tensor_path: Path, meta_path: Path, key: str) -> Splits | None:
    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        if tensor_path.stat().st_size != meta["tensor_bytes"]:
            raise ValueError("tensor file size does not match its sidecar")
        # load_file maps the file; clone so the datasets never depend on the cache file
        # (a later rewrite of that file cannot reach tensors already handed out).
        tensors = {k: v.clone() for k, v in load_file(str(tensor_path)).items()}
        out = []
        for split in ("train", "test"):
            out.append(
                ImageDataset(
                    images=tensors[f"{split}_images"],
                    labels=tensors[f"{split}_labels"],
                    classes=list(meta["classes"]),
                    name=meta["names"][split],
                )
            )
        return out[0], out[1]
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild
        log.warning("ignoring unreadable cache entry %s (%s); rebuilding", tensor_path, exc)
        return None


def _store(tensor_path: Path, meta_path: Path, key: str, data: Splits, parts: dict) -> None:
    train, test = data
    tensors = {
        "train_images": train.images.contiguous(),
        "train_labels": train.labels.contiguous(),
        "test_images": test.images.contiguous(),
        "test_labels": test.labels.contiguous(),
    }
    _atomic_write(tensor_path, lambda p: save_file(tensors, str(p)))
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "key_parts": parts,
        "classes": list(train.classes),
        "names": {"train": train.name, "test": test.name},
        "tensor_bytes": tensor_path.stat().st_size,
    }
    text = json.dumps(meta, indent=1, sort_keys=True, default=str)
    _atomic_write(meta_path, lambda p: p.write_text(text, encoding="utf-8"))


def cached(
    key_parts: dict[str, Any],
    source_paths: Sequence[str | Path],
    build: Callable[[], Splits],
    *,
    enabled: bool = True,
    directory: str | Path | None = None,
) -> Splits:
    """Return ``build()``'s ``(train, test)``, from the cache when an entry matches.

    With ``enabled=False`` the cache is neither read nor written. A cache folder that
    cannot be written only costs the caching (a warning is logged).
    """
    if not enabled:
        return build()
    folder = Path(directory) if directory is not None else cache_dir()
    key = cache_key(key_parts, source_paths)
    stem = _stem(key_parts, key)
    tensor_path = folder / f"{stem}.safetensors"
    meta_path = folder / f"{stem}.json"
    hit = _load(tensor_path, meta_path, key)
    if hit is not None:
        return hit
    data = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _store(tensor_path, meta_path, key, data, key_parts)
    except OSError as exc:
        log.warning("could not write dataset cache in %s (%s)", folder, exc)
    return data


def clear_cache(directory: str | Path | None = None) -> int:
    """Delete every dataset cache entry in the folder; returns how many files were removed."""
    folder = Path(directory) if directory is not None else cache_dir()
    removed = 0
    entry = re.compile(r".+-[0-9a-f]{40}\.(safetensors|json)")
    if folder.is_dir():
        for f in folder.iterdir():
            if entry.fullmatch(f.name) and f.is_file():
                f.unlink()
                removed += 1
    return removed
