"""Reader for ImageFolder-style data: ``ROOT/{train,test}/<class>/<file>``.

The source is either a directory with ``train/`` and ``test/`` subfolders or a ``.tar.gz``
with one top folder ``NAME/{train,test}/<class>/<file>`` (an archive holding ``train/``
and ``test/`` at its top is accepted too). Archives are streamed (plain ustar ``.tar.gz``
by a small built-in header parser, anything else by :mod:`tarfile`) and images decoded
with PIL from memory; nothing is extracted to disk.

* Classes are the sorted class-folder names; train and test must have the same set.
* Images become RGB unless every image of the dataset is greyscale (then 1 channel).
* If all images share one size it is kept; otherwise, or when ``image_size`` is given,
  each image is resized so its shorter side is ``S`` and centre-cropped to ``S x S``
  (``S`` = ``image_size`` or the smallest shorter side in the dataset), bilinear.
* Decoding runs in a process pool (one worker per CPU, at most 8) for datasets of more
  than a few thousand images, fed while the archive is still being read: for 32x32
  JPEGs, PIL's per-image Python overhead, not the codec, dominates. On 2 CPU cores the
  60,000 CIFAR-10 JPEGs take about 8 s (about 13 s in one process); the cache
  (:mod:`robustkd.data.cache`) makes later loads take a fraction of a second.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from robustkd.data.dataset import ImageDataset
from robustkd.errors import DataError

READER_VERSION = 1
log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".gif", ".tif", ".tiff", ".webp"}
)
_GREY_MODES = frozenset({"1", "L", "LA", "I", "F", "La"})
_CHUNK = 1024  # images per pool task
_POOL_MIN_IMAGES = 2048  # below this, decode in-process


def is_image_file(name: str) -> bool:
    """Whether ``name`` looks like an image file (by extension; hidden files are not)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- decoding


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` and centre-crop to ``size x size``."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return im.resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )


def _format_hint(data: bytes) -> tuple[str, ...] | None:
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG",)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("PNG",)
    return None


def decode_image(data: bytes | str, image_size: int | None = None) -> np.ndarray:
    """Decode one image to uint8 ``[H, W]`` (greyscale) or ``[H, W, 3]`` (colour).

    ``data`` is the encoded bytes or a file path.
    """
    if isinstance(data, str):
        with open(data, "rb") as fh:
            data = fh.read()
    # Naming the format skips probing every registered plugin (a visible cost per image).
    formats = _format_hint(data)
    with Image.open(io.BytesIO(data), formats=formats) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16"):
            arr16 = np.asarray(im).astype(np.uint32) >> 8
            out = Image.fromarray(arr16.astype(np.uint8), "L")
        elif mode in _GREY_MODES:
            out = im.convert("L")
        elif mode != "RGB":
            out = im.convert("RGB")
        else:
            out = im
        if image_size is not None:
            out = square_resize(out, image_size)
        return np.asarray(out, dtype=np.uint8)


def _decode_chunk(
    args: tuple[list[bytes | str], int | None],
) -> list[np.ndarray | str] | np.ndarray:
    """Pool task: decode a list of images; a failure becomes its error message.

    A chunk of equally shaped images comes back as one ``[n, C, H, W]`` array (one pickle
    instead of one per image, and the layout change done in the workers).
    """
    blobs, image_size = args
    out: list[np.ndarray | str] = []
    for blob in blobs:
        try:
            out.append(decode_image(blob, image_size))
        except Exception as exc:  # noqa: BLE001 - reported with the file name by the caller
            out.append(f"{type(exc).__name__}: {exc}")
    if out and all(isinstance(a, np.ndarray) for a in out):
        shapes = {a.shape for a in out}  # type: ignore[union-attr]
        if len(shapes) == 1:
            stacked = np.stack(out)  # type: ignore[arg-type]
            if stacked.ndim == 3:
                return stacked[:, None]
            return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))
    return out


def _pool_context() -> mp.context.BaseContext:
    # fork starts instantly and shares the already imported modules; spawn would
    # re-import torch in every worker.
    if sys.platform == "linux" and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class _Decoder:
    """Decodes images as they are fed, in a process pool when there are many."""

    def __init__(self, image_size: int | None, workers: int | None) -> None:
        self.image_size = image_size
        self.workers = _default_workers() if workers is None else max(1, workers)
        self.pending: list[bytes | str] = []
        self.results: list[object] = []  # decoded chunks or AsyncResults of chunks
        self.pool = None
        self.count = 0

    def feed(self, blob: bytes | str) -> None:
        self.pending.append(blob)
        self.count += 1
        if self.workers > 1 and self.count >= _POOL_MIN_IMAGES and self.pool is None:
            try:
                self.pool = _pool_context().Pool(self.workers)
            except (OSError, RuntimeError, ValueError) as exc:
                # e.g. no working semaphores in a sandbox: decode in this process instead
                log.warning(
                    "cannot start %d decode workers (%s); decoding in-process", self.workers, exc
                )
                self.workers = 1
        if self.pool is not None and len(self.pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        chunk, self.pending = self.pending, []
        if self.pool is not None:
            self.results.append(self.pool.apply_async(_decode_chunk, ((chunk, self.image_size),)))
        else:
            self.results.append(_decode_chunk((chunk, self.image_size)))

    def finish(self) -> list[list[np.ndarray | str] | np.ndarray]:
        """Decoded chunks in feed order (see :func:`_decode_chunk`)."""
        if self.pool is None:
            # Small dataset: everything is still pending; decode here.
            self.results.append(_decode_chunk((self.pending, self.image_size)))
            self.pending = []
        else:
            self._flush()
        try:
            return [r if isinstance(r, (list, np.ndarray)) else r.get() for r in self.results]
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------- layout


@dataclass
class _Entry:
    split: str
    cls: str
    rel: str  # path inside the class folder (posix)
    where: str  # full name for messages


class _Layout:
    """Collects class folders and image entries of both splits and validates them."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.class_dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
        self.split_seen: set[str] = set()
        self.entries: list[_Entry] = []

    def add_dir(self, parts: tuple[str, ...]) -> None:
        """A directory below the root, ``parts`` relative to it (``("train", "cat")``)."""
        if parts and parts[0] in SPLITS:
            self.split_seen.add(parts[0])
            if len(parts) >= 2 and not parts[1].startswith("."):
                self.class_dirs[parts[0]].add(parts[1])

    def add_file(self, parts: tuple[str, ...], where: str) -> bool:
        """Register a file; returns whether it is an image to decode."""
        if not parts or parts[0] not in SPLITS:
            return False  # e.g. a README next to train/ and test/
        self.split_seen.add(parts[0])
        if any(p.startswith(".") for p in parts[1:]) or not is_image_file(parts[-1]):
            return False
        if len(parts) < 3:
            raise DataError(
                f"{where}: image is not inside a class folder (expected {parts[0]}/<class>/<file>)"
            )
        self.class_dirs[parts[0]].add(parts[1])
        self.entries.append(_Entry(parts[0], parts[1], "/".join(parts[2:]), where))
        return True

    def validate(self, top: str) -> list[str]:
        """Check the layout; returns the sorted classes."""
        prefix = f"{self.source}:{top}" if top else self.source
        for split in SPLITS:
            if split not in self.split_seen:
                raise DataError(
                    f"{self.source}: missing split '{split}' (expected "
                    f"{top + '/' if top else ''}{split}/<class>/<file>)"
                )
        if not self.entries:
            raise DataError(f"{self.source}: no images found")
        counts: dict[tuple[str, str], int] = {}
        for e in self.entries:
            counts[(e.split, e.cls)] = counts.get((e.split, e.cls), 0) + 1
        for split in SPLITS:
            if not self.class_dirs[split]:
                raise DataError(f"{prefix}/{split}: no class folders with images")
            for cls in sorted(self.class_dirs[split]):
                if counts.get((split, cls), 0) == 0:
                    raise DataError(f"{prefix}/{split}/{cls}: empty class folder (no image files)")
        train, test = self.class_dirs["train"], self.class_dirs["test"]
        if train != test:
            raise DataError(
                f"{self.source}: train and test class sets differ "
                f"(only in train: {sorted(train - test)[:10]}, "
                f"only in test: {sorted(test - train)[:10]})"
            )
        return sorted(train)


def _tar_parts(name: str, source: Path) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p and p != ".")
    if name.startswith("/") or ".." in parts:
        raise DataError(f"{source}: unsafe member path {name!r}")
    return parts


class _NotPlainUstar(Exception):
    """The fast reader met something only :mod:`tarfile` handles (pax, GNU, ...)."""


_ZERO_BLOCK = bytes(512)
_REGULAR, _DIRECTORY, _OTHER = "file", "dir", "other"


class _GzipStream:
    """Sequential reads from a gzip file through one reusable decompression buffer."""

    def __init__(self, fh: io.BufferedReader) -> None:
        self.fh = fh
        self.z = zlib.decompressobj(wbits=31)
        self.buf = b""
        self.pos = 0
        self.eof = False

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n and not self.eof:
            chunk = self.fh.read(1 << 20)
            if chunk:
                more = self.z.decompress(chunk)
                while self.z.eof and self.z.unused_data:  # concatenated gzip members
                    rest = self.z.unused_data
                    self.z = zlib.decompressobj(wbits=31)
                    more += self.z.decompress(rest)
            else:
                self.eof = True
                more = self.z.flush()
            self.buf = self.buf[self.pos :] + more
            self.pos = 0
        out = self.buf[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _NotPlainUstar("base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _iter_ustar_gz(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Members of a plain-ustar ``.tar.gz`` as ``(name, kind, data)``; fast path.

    :mod:`tarfile` spends most of its time in per-member Python bookkeeping; archives of
    many small images read several times faster this way. Anything beyond plain ustar
    headers (pax/GNU extensions, base-256 sizes, other compressions) raises
    :class:`_NotPlainUstar` and the caller falls back to :mod:`tarfile`.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            raise _NotPlainUstar("not gzip")
        fh.seek(0)
        stream = _GzipStream(fh)
        while True:
            hdr = stream.read(512)
            if not hdr or hdr == _ZERO_BLOCK:
                return
            if len(hdr) < 512:
                raise DataError(f"{path}: archive is truncated")
            magic = hdr[257:263]
            if magic not in (b"ustar\x00", b"ustar "):
                raise _NotPlainUstar("not a ustar header")
            if _octal(hdr[148:156]) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise _NotPlainUstar("bad header checksum")
            flag = hdr[156:157]
            size = _octal(hdr[124:136])
            name = hdr[:100].split(b"\0", 1)[0]
            prefix = hdr[345:500].split(b"\0", 1)[0] if magic == b"ustar\x00" else b""
            if prefix:
                name = prefix + b"/" + name
            if flag in (b"0", b"\0", b"7"):
                kind = _REGULAR
            elif flag == b"5":
                kind = _DIRECTORY
            elif flag in (b"1", b"2", b"3", b"4", b"6"):
                kind = _OTHER
            else:
                raise _NotPlainUstar(f"member type {flag!r}")
            data = stream.read(size) if size else b""
            if len(data) < size:
                raise DataError(f"{path}: archive is truncated")
            if size % 512:
                stream.read(512 - size % 512)
            yield name.decode("utf-8", "surrogateescape"), kind, data


def _iter_tarfile(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Members of any archive :mod:`tarfile` reads, streamed, as ``(name, kind, data)``."""
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            if member.isfile():
                fh = tf.extractfile(member)
                assert fh is not None
                yield member.name, _REGULAR, fh.read()
            else:
                yield member.name, _DIRECTORY if member.isdir() else _OTHER, b""


def _consume_tar(
    path: Path, members: Iterator[tuple[str, str, bytes]], decoder: _Decoder
) -> tuple[_Layout, str]:
    layout = _Layout(str(path))
    top: str | None = None
    for member_name, kind, data in members:
        parts = _tar_parts(member_name, path)
        if not parts:
            continue
        if top is None:
            top = parts[0]
        if top in SPLITS and parts[0] in SPLITS:
            rel = parts  # archive without a top folder: train/ and test/ at the top
        elif parts[0] != top:
            raise DataError(
                f"{path}: expected a single top folder NAME/{{train,test}}/..., "
                f"found both {top!r} and {parts[0]!r}"
            )
        else:
            rel = parts[1:]
        if kind == _DIRECTORY:
            layout.add_dir(rel)
        elif kind == _REGULAR and layout.add_file(rel, f"{path}:{member_name}"):
            decoder.feed(data)
        # links and special files are ignored
    if top is None:
        raise DataError(f"{path}: archive is empty (no images found)")
    return layout, ("" if top in SPLITS else top)


def _scan_tar(
    path: Path, image_size: int | None, workers: int | None
) -> tuple[_Layout, str, _Decoder]:
    decoder = _Decoder(image_size, workers)
    try:
        try:
            layout, top = _consume_tar(path, _iter_ustar_gz(path), decoder)
        except _NotPlainUstar:
            decoder.close()
            decoder = _Decoder(image_size, workers)
            layout, top = _consume_tar(path, _iter_tarfile(path), decoder)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        decoder.close()
        raise DataError(f"{path}: cannot read archive ({type(exc).__name__}: {exc})") from exc
    except BaseException:
        decoder.close()
        raise
    return layout, top, decoder


def _walk_files(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            yield Path(dirpath) / f


def _scan_dir(root: Path, decoder: _Decoder) -> _Layout:
    layout = _Layout(str(root))
    try:
        for split in SPLITS:
            sdir = root / split
            if not sdir.is_dir():
                continue
            layout.add_dir((split,))
            for child in sorted(sdir.iterdir()):
                if child.is_dir():
                    layout.add_dir((split, child.name))
                    for f in _walk_files(child):
                        parts = (split, *f.relative_to(sdir).parts)
                        if layout.add_file(parts, str(f)):
                            decoder.feed(str(f))
                elif child.is_file():
                    layout.add_file((split, child.name), str(child))
    except BaseException:
        decoder.close()
        raise
    return layout


# --------------------------------------------------------------------------- assembly


def _hwc(block: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Per-image ``[H, W]`` / ``[H, W, 3]`` arrays of a decoded chunk."""
    if isinstance(block, list):
        return block
    if block.shape[1] == 1:
        return list(block[:, 0])
    return list(block.transpose(0, 2, 3, 1))


def _assemble(blocks: list[list[np.ndarray] | np.ndarray], image_size: int | None) -> np.ndarray:
    """Join decoded chunks into ``[N, C, H, W]`` uint8 following the size/colour rules."""
    if all(isinstance(b, np.ndarray) for b in blocks):
        hws = {b.shape[2:] for b in blocks}
        if len(hws) == 1 and (image_size is None or hws == {(image_size, image_size)}):
            # The common case: one image size everywhere; C-level concatenation.
            if any(b.shape[1] == 3 for b in blocks):
                blocks = [np.repeat(b, 3, axis=1) if b.shape[1] == 1 else b for b in blocks]
            return np.concatenate(blocks)  # type: ignore[arg-type]
    arrays = [a for b in blocks for a in _hwc(b)]
    grey = all(a.ndim == 2 for a in arrays)
    sizes = {a.shape[:2] for a in arrays}
    if image_size is not None or len(sizes) > 1:
        side = image_size if image_size is not None else min(min(hw) for hw in sizes)
        arrays = [
            a
            if a.shape[:2] == (side, side)
            else np.asarray(square_resize(Image.fromarray(a), side), dtype=np.uint8)
            for a in arrays
        ]
    h, w = arrays[0].shape[:2]
    if grey:
        out = np.empty((len(arrays), 1, h, w), dtype=np.uint8)
        for i, a in enumerate(arrays):
            out[i, 0] = a
        return out
    out = np.empty((len(arrays), h, w, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a if a.ndim == 3 else a[:, :, None]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def read_imagefolder(
    path: str | Path,
    image_size: int | None = None,
    name: str | None = None,
    workers: int | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Read an ImageFolder directory or ``.tar.gz`` into ``(train, test)`` datasets."""
    path = Path(path)
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if path.is_dir():
        decoder = _Decoder(image_size, workers)
        layout, top = _scan_dir(path, decoder), ""
        default_name = path.name
    elif path.is_file():
        layout, top, decoder = _scan_tar(path, image_size, workers)
        default_name = top or path.name.split(".")[0]
    else:
        raise DataError(f"{path}: no such file or folder")
    try:
        classes = layout.validate(top)
    except BaseException:
        decoder.close()
        raise
    blocks = decoder.finish()
    offset = 0
    for block in blocks:
        if isinstance(block, list):
            for j, result in enumerate(block):
                if isinstance(result, str):
                    where = layout.entries[offset + j].where
                    raise DataError(f"{where}: cannot decode image ({result})")
        offset += len(block)
    if offset != len(layout.entries):  # pragma: no cover - internal consistency
        raise DataError(f"{path}: decoded {offset} images for {len(layout.entries)} files")
    images = _assemble(blocks, image_size)  # type: ignore[arg-type]
    del blocks

    name = name or default_name
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in SPLITS:
        rows = sorted(
            (i for i, e in enumerate(layout.entries) if e.split == split),
            key=lambda i: (layout.entries[i].cls, layout.entries[i].rel),
        )
        labels = [index[layout.entries[i].cls] for i in rows]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            split_images = images[rows[0] : rows[0] + len(rows)]  # already in order: a view
        else:
            split_images = images[np.asarray(rows, dtype=np.int64)]
        out.append(
            ImageDataset(
                images=torch.from_numpy(split_images),
                labels=torch.tensor(labels, dtype=torch.int64),
                classes=list(classes),
                name=f"{name}-{split}",
            )
        )
    return out[0], out[1]


def iter_source_files(path: Path) -> Iterable[Path]:
    """Every file under ``path`` (for cache fingerprints); ``path`` itself if it is a file."""
    if path.is_file():
        return [path]
    return _walk_files(path)
