"""ImageFolder datasets too large for memory (ImageNet-1k), decoded lazily from disk.

The small datasets of this project live on the device as one uint8 tensor
(:class:`~robustkd.data.loader.DeviceLoader`). ImageNet-1k (1.28M JPEGs, ~150 GB) cannot, so
this module streams it: :class:`StreamedImageFolder` lists the files once (paths in one numpy
byte-string array, so forked workers do not copy a million Python strings) and decodes an
image only when it is asked for; :class:`StreamLoader` runs that in ``torch.utils.data``
worker processes and yields the same ``(x, y, idx)`` batches as ``DeviceLoader`` (``x``
normalised float32 on the device, ``y`` int64 on the device, ``idx`` int64 on the CPU), so
:func:`robustkd.training.loop.fit` consumes either.

Transforms (standard ImageNet practice, with PIL only; no torchvision):

* training: random-resized crop (area fraction ``scale`` = [0.08, 1], aspect ratio
  [3/4, 4/3] log-uniform, 10 tries then a centre crop) resized to ``crop_size`` (224),
  horizontal flip with probability 0.5;
* evaluation: resize the shorter side to ``resize_size`` (256 for 224, i.e. crop / 0.875) and
  take the centre ``crop_size`` square.

Both are done as a single ``Image.resize(..., box=crop_box)`` (one resampling, antialiased),
and for JPEGs the decoder is first told, via ``Image.draft``, the smallest size that still
gives the crop at least ``crop_size`` pixels: libjpeg then decodes at 1/2, 1/4 or 1/8 scale
when the crop region is at least twice the output on both sides (large photos). ImageNet's
typical ~500x375 images are rarely reduced: on an H100 host (16 cores, 15 workers) 500x375
JPEGs streamed at ~2,200 img/s for training with or without it.

Batches travel as uint8 ``[B, H, W, C]`` (4x less than float to pin and copy) and become
``[B, C, H, W]`` on the device by a permute, which is channels_last for free.

Reproducibility: every epoch draws its order and one seed per sample from a generator seeded
with ``(seed, epoch)``; a sample's crop and flip come from its own seed, so the batches do not
depend on the number of workers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from robustkd.data import cache as _cache
from robustkd.data import imagefolder as _imagefolder
from robustkd.data.dataset import ImageDataset
from robustkd.data.imagefolder import is_image_file
from robustkd.data.loader import DeviceLoader, EpochBatches, epoch_seed
from robustkd.errors import ConfigError, DataError
from robustkd.triggers import Trigger

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_SPLITS = ("val", "test")  # the first that exists is the evaluation split
_SEED_BOUND = 1 << 62


def scan_split(folder: str | Path, classes: Sequence[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Files under ``folder/<class>/`` as ``(relative paths (bytes), labels, classes)``.

    Classes are the sorted class-folder names (or ``classes``, e.g. those of the training
    split, so labels agree); files are sorted within a class and may sit in subfolders.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
    else:
        missing = sorted(set(found) - set(classes))
        if missing:
            raise DataError(f"{folder}: class folders {missing[:5]} are not in the training "
                            f"split ({len(missing)} in all)")
    paths: list[bytes] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cdir = folder / cls
        if not cdir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, folder)
            for f in sorted(filenames):
                if is_image_file(f):
                    paths.append(os.path.join(rel, f).encode("utf-8", "surrogateescape"))
                    labels.append(label)
    if not paths:
        raise DataError(f"{folder}: no images found in class folders "
                        "(expected <class>/<image> files)")
    return np.array(paths), np.array(labels, dtype=np.int64), list(classes)


def random_resized_box(width: int, height: int, scale: Sequence[float],
                       ratio: Sequence[float], rng: random.Random
                       ) -> tuple[float, float, float, float]:
    """A random crop ``(left, top, right, bottom)`` of area fraction ``scale`` and aspect
    ratio (width / height) log-uniform in ``ratio``; a centre crop after 10 misses."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, crop_size: int, resize_size: int
               ) -> tuple[float, float, float, float]:
    """The region that "shorter side to ``resize_size``, centre ``crop_size`` crop" keeps."""
    side = crop_size * min(width, height) / resize_size
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return left, top, left + side, top + side


class StreamedImageFolder(Dataset):
    """One split of an ImageFolder directory, decoded image by image when indexed.

    ``dataset[i]`` (evaluation transform, or training with seed 0) or ``dataset[(i, seed)]``
    gives ``(image uint8 [S, S, 3], label, i)``; :class:`StreamLoader` passes the seeds.
    """

    def __init__(self, folder: str | Path, *, train: bool, crop_size: int = 224,
                 resize_size: int | None = None, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, draft: bool = True,
                 classes: Sequence[str] | None = None, name: str | None = None) -> None:
        if not isinstance(crop_size, int) or crop_size < 1:
            raise ConfigError(f"crop_size must be a positive int, got {crop_size!r}")
        if resize_size is None:
            resize_size = int(round(crop_size / 0.875))
        if not isinstance(resize_size, int) or resize_size < crop_size:
            raise ConfigError(f"resize_size must be an int >= crop_size ({crop_size}), "
                              f"got {resize_size!r}")
        lo, hi = (float(v) for v in scale)
        r0, r1 = (float(v) for v in ratio)
        if not 0.0 < lo <= hi <= 1.0 or not 0.0 < r0 <= r1:
            raise ConfigError(f"random-resized crop needs 0 < scale lo <= hi <= 1 and "
                              f"0 < ratio lo <= hi, got scale {list(scale)}, ratio {list(ratio)}")
        self.root = str(Path(folder))
        self.files, labels, self.classes = scan_split(folder, classes)
        self.labels = torch.from_numpy(labels)
        self.train = bool(train)
        self.crop_size, self.resize_size = crop_size, resize_size
        self.scale, self.ratio = (lo, hi), (r0, r1)
        self.flip, self.draft = bool(flip), bool(draft)
        self.name = name or Path(folder).name

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return 3

    @property
    def image_size(self) -> tuple[int, int]:
        return self.crop_size, self.crop_size

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index].decode("utf-8", "surrogateescape"))

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int],
               name: str | None = None) -> StreamedImageFolder:
        """The files at ``index`` (same classes, transform and root), still undecoded.

        Mirrors :meth:`ImageDataset.subset`, so the per-class subset rules of
        :mod:`robustkd.data.subsets` (``--train-fraction``, ``--clean-fraction``) and the
        non-target filter of ASR apply to a file list exactly as to an in-memory dataset.
        """
        index = torch.as_tensor(index, dtype=torch.int64)
        out = copy.copy(self)
        out.files = self.files[index.numpy()]
        out.labels = self.labels[index]
        out.name = name or self.name
        return out

    def load(self, index: int, seed: int = 0) -> np.ndarray:
        """Decode and transform image ``index`` to uint8 ``[S, S, 3]`` (``seed``: its crop)."""
        path = self.path(index)
        out_size = (self.crop_size, self.crop_size)
        try:
            with Image.open(path) as im:
                width, height = im.size
                flip = False
                if self.train:
                    rng = random.Random(seed)
                    box = random_resized_box(width, height, self.scale, self.ratio, rng)
                    flip = self.flip and rng.random() < 0.5
                else:
                    box = center_box(width, height, self.crop_size, self.resize_size)
                if self.draft and im.format == "JPEG":
                    bw, bh = box[2] - box[0], box[3] - box[1]
                    im.draft("RGB", (max(1, math.ceil(width * self.crop_size / bw)),
                                     max(1, math.ceil(height * self.crop_size / bh))))
                    sx, sy = im.size[0] / width, im.size[1] / height
                    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                if im.mode not in ("RGB", "L"):
                    im = im.convert("RGB")
                out = im.resize(out_size, Image.Resampling.BILINEAR, box=box)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from None
        if out.mode != "RGB":
            out = out.convert("RGB")
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        return self.load(index, int(seed)), int(self.labels[index]), index


def _collate(samples: list[tuple[np.ndarray, int, int]]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    index = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return images, labels, index


class _EpochSampler(Sampler):
    """``(index, seed)`` pairs of one epoch; runs in the main process, so ``epoch`` set there
    reaches persistent workers too."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, _SEED_BOUND, (self.n,), generator=g)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.draw(self.epoch)
        return zip(order.tolist(), seeds.tolist(), strict=True)


class StreamLoader(EpochBatches):
    """``(x, y, idx)`` batches of a :class:`StreamedImageFolder`, decoded by worker processes.

    The interface matches :class:`~robustkd.data.loader.DeviceLoader` (``len``, ``set_epoch``,
    ``order``, ``num_samples``). ``mean``/``std`` default to the ImageNet statistics.
    ``trigger`` (for ASR) is applied to each decoded uint8 batch on the device and quantised
    back to uint8 before normalisation, as :func:`~robustkd.evaluation.metrics.triggered_test_set`
    does to an in-memory test set (a triggered image file would be stored that way).
    """

    def __init__(self, ds: StreamedImageFolder, batch_size: int, *,
                 device: str | torch.device = "cpu", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, channels_last: bool = False,
                 workers: int | None = None, prefetch: int = 4,
                 pin_memory: bool | None = None, trigger: Trigger | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean/std need 3 values (std > 0), got {mean}, {std}")
        self.dataset = ds
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.trigger = trigger
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._sampler = _EpochSampler(len(ds), bool(shuffle), int(seed))
        pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch} if self.workers else {}
        self._loader = DataLoader(ds, batch_sampler=BatchSampler(self._sampler, self.batch_size,
                                                                 self.drop_last),
                                  num_workers=self.workers, collate_fn=_collate,
                                  pin_memory=pin, **extra)
        self.epoch = 0

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (CPU int64), without decoding anything."""
        return self._sampler.draw(epoch)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._sampler.epoch = self.epoch
        self.epoch += 1
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index in self._loader:
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            if self.trigger is not None:
                x = self.trigger.apply_uint8(x)
            x = (x.float().div_(255.0) - self.mean) / self.std
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                             else torch.contiguous_format)
            yield x, labels.to(self.device, non_blocking=True), index


@dataclass
class StreamedSplits:
    """Train and evaluation splits of a streamed dataset, with the normalisation to use."""

    train: StreamedImageFolder
    test: StreamedImageFolder
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = ""

    holdout: None = None  # no validation carve-out of a streamed training split (yet)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def augment(self) -> dict[str, Any]:
        """The training transform, in the form run metadata records augmentation policies.

        Informational only: the workers apply it while decoding, so a ``DeviceLoader``
        never sees it (:func:`loader_for` ignores ``augment`` for streamed data).
        """
        return {"kind": "streamed_resized_crop", "scale": list(self.train.scale),
                "ratio": list(self.train.ratio), "flip": self.train.flip}

    def describe(self) -> dict[str, Any]:
        """What a run records so that a later run (``distill --teacher RUN_DIR``,
        ``evaluate``) opens the same data the same way: streamed, at the same crop."""
        return {"crop_size": self.train.crop_size, "resize_size": self.train.resize_size,
                "scale": list(self.train.scale), "flip": self.train.flip,
                "draft": self.train.draft, "source": self.source,
                "eval_split": Path(self.test.root).name}

    def loader(self, split: str = "train", batch_size: int = 256, **kwargs) -> StreamLoader:
        """A :class:`StreamLoader` over ``train`` (shuffled, full batches) or ``test``."""
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        train = split == "train"
        kwargs.setdefault("shuffle", train)
        kwargs.setdefault("drop_last", train and len(self.train) > batch_size)
        kwargs.setdefault("mean", self.mean)
        kwargs.setdefault("std", self.std)
        return StreamLoader(self.train if train else self.test, batch_size, **kwargs)


def load_streamed(name: str, data_root: str | Path, *, crop_size: int = 224,
                  resize_size: int | None = None, scale: Sequence[float] = (0.08, 1.0),
                  flip: bool = True, draft: bool = True,
                  mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> StreamedSplits:
    """Open ``DATA_ROOT/NAME/{train,val}/<class>/<image>`` (``test/`` instead of ``val/`` works
    too) for streaming; only file names are read here.

    Without that folder, an ImageFolder archive ``DATA_ROOT/NAME.tar.gz`` (or ``.tgz``, the
    layout :func:`robustkd.data.load_dataset` reads) is extracted once into the cache folder
    (:func:`extract_archive`): workers need files to open, not one compressed stream.

    For ``imagenet`` the official validation images must be sorted into class folders like
    the training ones (the usual ``val/<wnid>/ILSVRC2012_val_*.JPEG`` layout). ``mean``/``std``
    default to the ImageNet statistics (computing them would mean decoding the whole set).
    """
    root = Path(data_root).expanduser()
    folder = root if root.name == name and (root / "train").is_dir() else root / name
    if not _has_stream_splits(folder):
        archive = next((a for a in (root / f"{name}.tar.gz", root / f"{name}.tgz")
                        if a.is_file()), None)
        if archive is not None:
            folder = extract_archive(archive, name)
    evals = [folder / s for s in EVAL_SPLITS if (folder / s).is_dir()]
    if not (folder / "train").is_dir() or not evals:
        raise DataError(
            f"streamed dataset {name!r} not found: expected {folder}/train/<class>/<image> and "
            f"{folder}/val/<class>/<image> (or test/ instead of val/)"
            + ("; ImageNet's official val images must first be sorted into class folders"
               if name == "imagenet" else ""))
    options = {"crop_size": crop_size, "resize_size": resize_size, "draft": draft}
    train = StreamedImageFolder(folder / "train", train=True, scale=scale, flip=flip,
                                name=f"{name}-train", **options)
    test = StreamedImageFolder(evals[0], train=False, classes=train.classes,
                               name=f"{name}-{evals[0].name}", **options)
    return StreamedSplits(train, test, name, tuple(mean), tuple(std), source=str(folder))


def _has_stream_splits(folder: Path) -> bool:
    return (folder / "train").is_dir() and any((folder / e).is_dir() for e in EVAL_SPLITS)


EXTRACT_MARKER = ".robustkd-extracted.json"
_EXTRACT_FORMAT = 1


def extract_archive(archive: str | Path, name: str, directory: str | Path | None = None) -> Path:
    """Extract the images of ImageFolder archive ``archive`` once; returns ``.../NAME``.

    The target is ``CACHE/extracted/NAME-<key>/NAME`` (``CACHE`` = ``$ROBUSTKD_CACHE_DIR``,
    ``<key>`` from the archive's path, size and mtime, so a changed archive is extracted
    anew). Extraction goes to a temporary sibling folder that gets a marker file last and is
    then renamed into place: a half-extracted tree is never used, and of two concurrent
    extractions one wins and the other's copy is discarded. Only image files under
    ``train/``, ``val/`` and ``test/`` are written; member paths are checked (no absolute
    paths, no ``..``) by the same rules the in-memory reader applies.
    """
    archive = Path(archive).expanduser().resolve()
    base = Path(directory) if directory is not None else _cache.cache_dir()
    key = _cache.cache_key({"reader": "extract", "version": _EXTRACT_FORMAT, "name": name},
                           [archive])
    final = base / "extracted" / f"{name}-{key}"
    if (final / EXTRACT_MARKER).is_file():
        return final / name
    final.parent.mkdir(parents=True, exist_ok=True)
    log.warning("extracting %s into %s (once; later runs reuse it)", archive, final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        count = _extract_images(archive, tmp / name)
        marker = {"archive": str(archive), "images": count, "key": key}
        (tmp / EXTRACT_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        if final.exists():  # left without a marker by something else: not ours to trust
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / EXTRACT_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent extraction won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / name


def _extract_images(archive: Path, out: Path) -> int:
    """Write the archive's split images below ``out`` (``out/train/<class>/...``)."""
    try:
        try:
            return _write_members(archive, _imagefolder._iter_ustar_gz(archive), out)
        except _imagefolder._NotPlainUstar:
            shutil.rmtree(out, ignore_errors=True)
            return _write_members(archive, _imagefolder._iter_tarfile(archive), out)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot read archive ({type(exc).__name__}: {exc})") from exc


def _write_members(archive: Path, members: Iterator[tuple[str, str, bytes]], out: Path) -> int:
    splits = ("train", *EVAL_SPLITS)
    count = 0
    top: str | None = None
    for member_name, kind, data in members:
        parts = _imagefolder._tar_parts(member_name, archive)
        if not parts or kind != "file":
            continue
        top = parts[0] if top is None else top
        rel = parts if top in splits else parts[1:]  # NAME/train/... or train/... at the top
        if (len(rel) < 3 or rel[0] not in splits or any(p.startswith(".") for p in rel)
                or not is_image_file(rel[-1])):
            continue
        target = out.joinpath(*rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        count += 1
    if not count:
        raise DataError(f"{archive}: no images under train/, val/ or test/ class folders")
    return count


def is_streamed(ds: object) -> bool:
    """Whether ``ds`` is decoded from disk on demand (vs. an in-memory ``ImageDataset``)."""
    return isinstance(ds, StreamedImageFolder)


def loader_for(ds: ImageDataset | StreamedImageFolder, batch_size: int, *,
               device: str | torch.device = "cpu", mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, shuffle: bool = False,
               augment: dict | None = None, drop_last: bool = False, seed: int = 0,
               channels_last: bool = False, workers: int | None = None,
               trigger: Trigger | None = None) -> DeviceLoader | StreamLoader:
    """``(x, y, idx)`` batches of either kind of dataset, so training and evaluation code
    need not know where the images live.

    In-memory data get a :class:`DeviceLoader` with exactly these arguments (``workers``
    is ignored); streamed data a :class:`StreamLoader`, whose workers apply the dataset's
    own transform (``augment`` is ignored) and, for ASR, ``trigger``.
    """
    if is_streamed(ds):
        return StreamLoader(ds, batch_size, device=device,
                            mean=IMAGENET_MEAN if mean is None else mean,
                            std=IMAGENET_STD if std is None else std, shuffle=shuffle,
                            drop_last=drop_last, seed=seed, channels_last=channels_last,
                            workers=workers, trigger=trigger)
    if trigger is not None:
        raise ConfigError("in-memory data are triggered before loading "
                          "(robustkd.evaluation.metrics.triggered_test_set), not by the loader")
    return DeviceLoader(ds, batch_size, device=device, mean=mean, std=std, shuffle=shuffle,
                        augment=augment, drop_last=drop_last, seed=seed,
                        channels_last=channels_last)
