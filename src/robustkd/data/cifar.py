"""Reader (and downloader) for the official CIFAR-10 / CIFAR-100 python archives.

The official archives hold Python pickles of numpy arrays. ``pickle`` can run arbitrary
code while loading, so :class:`RestrictedUnpickler` only resolves the handful of numpy
callables that rebuilding an array needs and refuses every other global with
:class:`~robustkd.errors.DataError`.

Accepted inputs for ``read_cifar(name, path)``:

* the archive itself (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), read
  without extracting it;
* the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or a folder that
  contains it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError, DataError

READER_VERSION = 1


@dataclass(frozen=True)
class CifarArchive:
    """Where one official CIFAR variant lives and how its pickles are laid out."""

    name: str
    url: str
    filename: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


CIFAR_ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": CifarArchive(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _archive(name: str) -> CifarArchive:
    try:
        return CIFAR_ARCHIVES[name]
    except KeyError:
        raise ConfigError(
            f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_ARCHIVES)}"
        ) from None


# --------------------------------------------------------------------------- unpickling


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for ``bytes`` (latin1 only)."""
    if encoding != "latin1" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Pickles name the module of the numpy that wrote them: numpy 1.x writes
    # ``numpy.core.*``, numpy 2.x ``numpy._core.*``. Both map to the installed numpy.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, nothing else."""

    _allowed: dict[tuple[str, str], Callable[..., Any]] | None = None

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        allowed = RestrictedUnpickler._allowed or {}
        try:
            return allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refusing to load pickle global {module}.{name} "
                "(only numpy arrays are allowed in dataset files)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: refusing pickle persistent id {pid!r}")


def restricted_loads(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` allowing only numpy arrays; errors become :class:`DataError`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _str_keys(obj: Any, source: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- reading


def _to_images(data: Any, source: str) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise DataError(f"{source}: 'data' must be uint8, got {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 3 * 32 * 32:
        return arr.reshape(-1, 3, 32, 32)
    if arr.ndim == 4 and arr.shape[1:] == (3, 32, 32):
        return arr
    raise DataError(f"{source}: 'data' must have shape [N, 3072], got {tuple(arr.shape)}")


def _batch(blob: bytes, source: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(restricted_loads(blob, source), source)
    if "data" not in d or label_key not in d:
        raise DataError(
            f"{source}: missing key {'data' if 'data' not in d else label_key!r} "
            f"(keys: {sorted(d)})"
        )
    images = _to_images(d["data"], source)
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _locate_folder(info: CifarArchive, path: Path) -> Path | None:
    for cand in (path, path / info.folder):
        if (cand / info.meta).is_file() and all((cand / f).is_file() for f in info.train):
            return cand
    return None


def _read_members(info: CifarArchive, path: Path) -> dict[str, bytes]:
    """The raw bytes of every file the variant needs, keyed by base name."""
    wanted = {info.meta, *info.train, *info.test}
    found: dict[str, bytes] = {}
    if path.is_dir():
        folder = _locate_folder(info, path)
        if folder is None:
            raise DataError(
                f"{path}: not an extracted {info.name} folder (expected {info.folder}/ with "
                f"{', '.join(sorted(wanted))})"
            )
        for fname in wanted:
            f = folder / fname
            if not f.is_file():
                raise DataError(f"{f}: missing file of the official {info.name} archive")
            found[fname] = f.read_bytes()
        return found
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                parts = [p for p in PurePosixPath(member.name).parts if p not in ("", ".")]
                if len(parts) == 2 and parts[0] == info.folder and parts[1] in wanted:
                    if not member.isfile():
                        raise DataError(f"{path}:{member.name}: not a regular file")
                    fh = tf.extractfile(member)
                    assert fh is not None
                    found[parts[1]] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read archive ({exc})") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path}: not an official {info.name} archive, missing "
            f"{', '.join(info.folder + '/' + m for m in missing)}"
        )
    return found


def read_cifar(name: str, path: str | Path) -> tuple[ImageDataset, ImageDataset]:
    """Read CIFAR-10 or CIFAR-100 (fine labels) from the official archive or its folder."""
    info = _archive(name)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    members = _read_members(info, path)
    meta_src = f"{path}:{info.folder}/{info.meta}"
    meta = _str_keys(restricted_loads(members[info.meta], meta_src), meta_src)
    if info.names_key not in meta:
        raise DataError(f"{meta_src}: missing key {info.names_key!r} (keys: {sorted(meta)})")
    classes = [_text(c) for c in meta[info.names_key]]

    def split(files: tuple[str, ...], split_name: str) -> ImageDataset:
        imgs, labs = [], []
        for fname in files:
            i, lab = _batch(members[fname], f"{path}:{info.folder}/{fname}", info.label_key)
            imgs.append(i)
            labs.append(lab)
        return ImageDataset(
            images=torch.from_numpy(np.ascontiguousarray(np.concatenate(imgs))),
            labels=torch.from_numpy(np.concatenate(labs)),
            classes=list(classes),
            name=f"{info.name}-{split_name}",
        )

    return split(info.train, "train"), split(info.test, "test")


def find_cifar(name: str, root: str | Path) -> Path | None:
    """The official archive or extracted folder of ``name`` inside ``root``, if present."""
    info = _archive(name)
    root = Path(root)
    archive = root / info.filename
    if archive.is_file():
        return archive
    for folder in (root / info.folder, root / name / info.folder, root):
        if folder.is_dir() and _locate_folder(info, folder) == folder:
            return folder
    return None


# --------------------------------------------------------------------------- download


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar(name: str, root: str | Path, *, timeout: float = 60.0) -> Path:
    """Download the official archive of ``name`` into ``root`` and check its md5.

    The download goes to a temporary file in ``root`` that is renamed into place only
    after the checksum matches; on a mismatch the temporary file is deleted and
    :class:`DataError` is raised. An existing archive with the right md5 is reused.
    """
    info = _archive(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / info.filename
    if target.is_file() and _md5(target) == info.md5:
        return target
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{info.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(info.url, timeout=timeout)
            except OSError as exc:
                raise DataError(
                    f"cannot download {info.url} ({exc}); download it by hand into {root} "
                    "or pass --data-root pointing at a folder that holds it"
                ) from exc
            with contextlib.closing(response):
                for block in iter(lambda: response.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
        digest = h.hexdigest()
        if digest != info.md5:
            raise DataError(
                f"{info.url}: md5 mismatch (expected {info.md5}, got {digest}); "
                "the download was deleted, try again"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return target
