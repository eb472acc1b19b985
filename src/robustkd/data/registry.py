"""Find, read (through the cache) and describe datasets by name.

``load_dataset(name, data_root)`` resolves, in order:

1. ``digits`` and ``shapes``: built in memory, no ``data_root`` needed (``EMBEDDED``);
2. ``DATA_ROOT/NAME.tar.gz`` (or ``.tgz``): an ImageFolder archive;
3. ``DATA_ROOT/NAME/`` with ``train/`` and ``test/`` subfolders (or ``DATA_ROOT`` itself
   when it is called ``NAME`` and has them): an ImageFolder directory;
4. for ``cifar10``/``cifar100``: the official python archive or its extracted folder in
   ``DATA_ROOT``, downloaded there first when ``download=True``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from robustkd.data import cache as _cache
from robustkd.data import cifar as _cifar
from robustkd.data import embedded as _embedded
from robustkd.data import fractals as _fractals
from robustkd.data import imagefolder as _imagefolder
from robustkd.data import synthetic as _synthetic
from robustkd.data.dataset import DatasetSplits, ImageDataset
from robustkd.data.subsets import split_validation
from robustkd.errors import DataError

_KNOWN: dict[str, dict[str, Any]] = {
    "digits": {
        "description": "scikit-learn 8x8 handwritten digits upsampled to 16x16 (embedded, "
        "no files needed); fixed stratified 80/20 split",
        "classes": 10,
        "image_size": 16,
        "channels": 1,
        "files": [],
        "download": False,
    },
    "shapes": {
        "description": "generated: ten shape classes in random colour, place and size on "
        "backgrounds of random sinusoidal gratings, 10k/2k 32x32 colour images (embedded, no "
        "files needed; the same images on every machine)",
        "classes": 10,
        "image_size": 32,
        "channels": 3,
        "files": [],
        "download": False,
    },
    "fractals": {
        "description": "generated: ten classes of IFS fractals (FractalDB-style), each image "
        "a jittered copy in random colour, place and size on a dark background, 10k/2k 32x32 "
        "colour images (embedded, no files needed)",
        "classes": 10,
        "image_size": 32,
        "channels": 3,
        "files": [],
        "download": False,
    },
    "cifar10": {
        "description": "CIFAR-10: 50k/10k 32x32 colour images, 10 classes",
        "classes": 10,
        "image_size": 32,
        "channels": 3,
        "files": ["cifar10.tar.gz", "cifar10/", "cifar-10-python.tar.gz", "cifar-10-batches-py/"],
        "download": True,
    },
    "cifar100": {
        "description": "CIFAR-100: 50k/10k 32x32 colour images, 100 fine classes",
        "classes": 100,
        "image_size": 32,
        "channels": 3,
        "files": [
            "cifar100.tar.gz",
            "cifar100/",
            "cifar-100-python.tar.gz",
            "cifar-100-python/",
        ],
        "download": True,
    },
    "gtsrb": {
        "description": "German Traffic Sign Recognition Benchmark at 32x32, 43 classes",
        "classes": 43,
        "image_size": 32,
        "channels": 3,
        "files": ["gtsrb.tar.gz", "gtsrb/"],
        "download": False,
    },
    "flower17": {
        "description": "Oxford Flower-17, 17 classes, 1190/170 images, centre-cropped squares "
        "(128x128 unless image_size is given)",
        "classes": 17,
        "image_size": None,
        "channels": 3,
        "files": ["flower17.tar.gz", "flower17/"],
        "download": False,
    },
    "tinyimagenet200": {
        "description": "Tiny-ImageNet-200 at 64x64, 200 classes (ImageNet stand-in)",
        "classes": 200,
        "image_size": 64,
        "channels": 3,
        "files": ["tinyimagenet200.tar.gz", "tinyimagenet200/"],
        "download": False,
    },
    "imagenet": {
        "description": "ImageNet-1k (ILSVRC-2012), 1000 classes, streamed from disk (not held "
        "in memory): robustkd.data.streaming.load_streamed; random-resized crop 224 + flip "
        "for training, resize 256 + centre crop 224 for evaluation",
        "classes": 1000,
        "image_size": 224,
        "channels": 3,
        "files": ["imagenet/train/<wnid>/", "imagenet/val/<wnid>/"],
        "download": False,
        "streamed": True,
    },
}
STREAMED = frozenset(n for n, info in _KNOWN.items() if info.get("streamed"))
# datasets built in memory without files (fast: not cached): loader, default size, source
EMBEDDED = {
    "digits": (_embedded.load_digits, _embedded.DIGITS_SIZE,
               "embedded:sklearn.datasets.load_digits"),
    "shapes": (_synthetic.load_shapes, _synthetic.SHAPES_SIZE,
               "generated:robustkd.data.synthetic.load_shapes"),
    "fractals": (_fractals.load_fractals, _fractals.FRACTALS_SIZE,
                 "generated:robustkd.data.fractals.load_fractals"),
}

HOLDOUT_SEED = 20_211_115  # fixed: the validation split must not depend on a run's seed
_NO_FLIP = frozenset({"digits", "gtsrb"})  # mirrored digits / signs change meaning
_STAT_CHUNK = 8192


def list_datasets() -> list[dict[str, Any]]:
    """Known dataset names with a description and the files ``load_dataset`` looks for."""
    out = [{"name": name, **info} for name, info in _KNOWN.items()]
    out.append(
        {
            "name": "NAME",
            "description": "any NAME with an ImageFolder layout: DATA_ROOT/NAME.tar.gz holding "
            "NAME/{train,test}/<class>/<file>, or a folder DATA_ROOT/NAME/{train,test}/<class>/",
            "classes": None,
            "image_size": None,
            "channels": None,
            "files": ["NAME.tar.gz", "NAME/"],
            "download": False,
        }
    )
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images in [0, 1].

    Exact: a 256-bin histogram per channel is accumulated over chunks of images and the
    moments are taken from it in float64 (much faster than summing floats).
    """
    if images.shape[0] == 0:
        raise DataError("cannot compute channel statistics of an empty dataset")
    if images.dtype != torch.uint8:
        raise DataError(f"channel statistics need uint8 images, got {images.dtype}")
    c = images.shape[1]
    hist = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, images.shape[0], _STAT_CHUNK):
        chunk = images[start : start + _STAT_CHUNK].cpu()
        for k in range(c):
            hist[k] += torch.bincount(chunk[:, k].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    counts = hist.to(torch.float64)
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = ((counts * (values - mean[:, None]) ** 2).sum(1) / n).clamp_(min=0.0)
    std = var.sqrt().clamp_(min=1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def default_augment(name: str, image_size: tuple[int, int]) -> dict[str, Any]:
    """Default training augmentation for a dataset of this name and image size."""
    flip = name.lower() not in _NO_FLIP
    size = max(image_size)
    if size <= 64:
        return {"kind": "crop", "pad": max(1, size // 8), "flip": flip}
    return {"kind": "resized_crop", "scale": [0.35, 1.0], "flip": flip}


def _has_splits(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _not_found(name: str, root: Path | None, tried: list[Path], download: bool) -> DataError:
    known = ", ".join(sorted(_KNOWN))
    if root is None:
        return DataError(
            f"dataset {name!r} needs data files: pass --data-root DIR (data_root=...) pointing "
            f"at a folder with {name}.tar.gz or {name}/train + {name}/test "
            f"(built-in without files: {', '.join(EMBEDDED)}; known names: {known})"
        )
    folder = root / name
    if folder.is_dir() and not _has_splits(folder):
        inside = sorted(p.name for p in folder.iterdir())[:6]
        missing = [s for s in ("train", "test") if not (folder / s).is_dir()]
        return DataError(
            f"{folder} exists but has no {' or '.join(f'{m}/' for m in missing)} folder "
            f"(it holds: {', '.join(inside) or 'nothing'}); an ImageFolder dataset needs "
            f"{folder}/train/<class>/<image> and {folder}/test/<class>/<image>")
    lines = "\n  ".join(str(p) for p in tried)
    hint = ""
    if name in _cifar.CIFAR_ARCHIVES and not download:
        hint = " or add --download (download=True) to fetch the official archive"
    return DataError(
        f"dataset {name!r} not found under {root}; tried:\n  {lines}\n"
        f"Put {name}.tar.gz (holding {name}/{{train,test}}/<class>/<file>) or a folder "
        f"{name}/{{train,test}}/<class>/ into the folder given with --data-root{hint}."
    )


def _read(
    key: dict[str, Any], sources: list[Path], build: Any, cache: bool
) -> tuple[ImageDataset, ImageDataset]:
    return _cache.cached(key, sources, build, enabled=cache)


def _resize_square(ds: ImageDataset, size: int) -> ImageDataset:
    if ds.image_size == (size, size):
        return ds
    import numpy as np
    from PIL import Image

    arr = ds.images.permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        im = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        r = np.asarray(_imagefolder.square_resize(im, size), dtype=np.uint8)
        out.append(r if r.ndim == 3 else r[:, :, None])
    images = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, ds.labels, list(ds.classes), name=ds.name)


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    cache: bool = True,
    holdout: float | None = None,
) -> DatasetSplits:
    """Load a dataset by name as :class:`DatasetSplits` (stats and augmentation filled in).

    ``holdout`` (in (0, 1)) carves that fraction of every training class out as the
    ``test`` split: a validation set for choosing settings without touching the test set.
    The carve uses a fixed seed, so every run with the same ``holdout`` sees the same split.
    """
    name = str(name).strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DataError(f"invalid dataset name {name!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    key_name = name.lower()
    if key_name in STREAMED:
        raise DataError(
            f"dataset {name!r} is streamed from disk, not loaded into memory: use "
            f"robustkd.data.streaming.load_streamed({key_name!r}, data_root) and its "
            "StreamLoader (for an in-memory ImageNet stand-in use tinyimagenet200)")
    root = Path(data_root).expanduser() if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(
            f"data root {root} does not exist or is not a folder; pass --data-root DIR "
            "with the dataset files"
        )

    data: tuple[ImageDataset, ImageDataset] | None = None
    source = ""
    tried: list[Path] = []
    if key_name in EMBEDDED:
        loader, default_size, source = EMBEDDED[key_name]
        data = loader(image_size or default_size)
    elif root is not None:
        data, source = _resolve_files(name, key_name, root, image_size, download, cache, tried)
    if data is None:
        raise _not_found(name, root, tried, download)

    train, test = data
    if holdout:
        train, test = split_validation(train, holdout, seed=HOLDOUT_SEED)
    out_name = key_name if key_name in EMBEDDED else name
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        train=train,
        test=test,
        name=out_name,
        mean=mean,
        std=std,
        augment=default_augment(out_name, train.image_size),
        source=source,
        holdout=holdout or None,
    )


def _resolve_files(
    name: str,
    key_name: str,
    root: Path,
    image_size: int | None,
    download: bool,
    cache: bool,
    tried: list[Path],
) -> tuple[tuple[ImageDataset, ImageDataset] | None, str]:
    def imagefolder(path: Path) -> tuple[ImageDataset, ImageDataset]:
        key = {
            "reader": "imagefolder",
            "version": _imagefolder.READER_VERSION,
            "name": name,
            "image_size": image_size,
        }
        return _read(
            key,
            [path],
            lambda: _imagefolder.read_imagefolder(path, image_size=image_size, name=name),
            cache,
        )

    spellings = list(dict.fromkeys([name, key_name]))
    for n in spellings:
        for archive in (root / f"{n}.tar.gz", root / f"{n}.tgz"):
            tried.append(archive)
            if archive.is_file():
                return imagefolder(archive), str(archive)
    for n in spellings:
        folder = root / n
        tried.append(folder)
        if folder.is_dir() and _has_splits(folder):
            return imagefolder(folder), str(folder)
    if root.name in spellings and _has_splits(root):
        return imagefolder(root), str(root)

    if key_name in _cifar.CIFAR_ARCHIVES:
        info = _cifar.CIFAR_ARCHIVES[key_name]
        tried.extend([root / info.filename, root / info.folder])
        found = _cifar.find_cifar(key_name, root)
        if found is None and download:
            found = _cifar.download_cifar(key_name, root)
        if found is not None:
            key = {
                "reader": "cifar",
                "version": _cifar.READER_VERSION,
                "name": key_name,
                "image_size": image_size,
            }

            def build() -> tuple[ImageDataset, ImageDataset]:
                train, test = _cifar.read_cifar(key_name, found)
                if image_size is not None:
                    train = _resize_square(train, image_size)
                    test = _resize_square(test, image_size)
                return train, test

            return _read(key, [found], build, cache), str(found)
    return None, ""


# --------------------------------------------------------------------------- verify


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_data_root(data_root: str | Path) -> list[tuple[str, bool, str]]:
    """Check files in ``data_root`` against its ``SHA256SUMS`` (``sha256sum`` format).

    Returns ``(file, ok, detail)`` per listed file (and per malformed line); an empty list
    when the folder has no ``SHA256SUMS``. Raises :class:`DataError` if the folder is missing.
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return []
    results: list[tuple[str, bool, str]] = []
    base = root.resolve()
    for lineno, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            results.append((f"SHA256SUMS:{lineno}", False, f"malformed line: {line!r}"))
            continue
        expected, fname = parts[0].lower(), parts[1].strip()
        fname = fname[1:] if fname.startswith("*") else fname
        target = (root / fname).resolve()
        if base != target and base not in target.parents:
            results.append((fname, False, "path points outside the data root"))
        elif not target.is_file():
            results.append((fname, False, "missing"))
        else:
            got = _sha256(target)
            if got == expected:
                results.append((fname, True, "ok"))
            else:
                results.append((fname, False, f"sha256 mismatch: expected {expected}, got {got}"))
    return results
