"""The generated dataset ``fractals`` (no files, no network needed).

Ten classes, each an iterated function system (IFS) of 2-4 contractive affine maps drawn
from a fixed seed, as in FractalDB (Kataoka et al., ACCV 2020), whose images pre-train
networks to features that transfer to natural images. Each image renders its class's IFS by
the chaos game with every map's matrix scaled by its own factor in [0.85, 1.15] and its
translation moved a little, at a random place and size, in one random colour on a random
dark background, with pixel noise and a random horizontal flip. Unlike ``shapes`` (on which
no backdoor crossed FKD), a stripes trigger implanted in a teacher trained on these images
does reach an FKD student (docs/RESULTS.md), which is what the demo needs to show. The
images are a pure function of each split's fixed seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from robustkd.data.dataset import ImageDataset
from robustkd.errors import DataError

FRACTALS_SIZE = 32
FRACTALS_TRAIN = 10_000
FRACTALS_TEST = 2_000
FRACTALS_CLASSES = tuple(f"fractal-{i}" for i in range(10))
FRACTALS_SEED = 20_261_207  # the classes' IFS
MAPS = (2, 5)  # maps per IFS: at least 2, fewer than 5
MAX_GAIN = 0.95  # largest singular value of a map: contractive, so the chaos game settles
JITTER = 0.15  # each image scales each map's matrix by U(1 - JITTER, 1 + JITTER)
STEPS = 1500  # chaos-game steps per image (the first BURN_IN not drawn)
BURN_IN = 20
_CHUNK = 1000


def class_systems(seed: int = FRACTALS_SEED, classes: int = len(FRACTALS_CLASSES)
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each class's IFS ``(matrices [K, 2, 2], translations [K, 2], probabilities [K])``:
    a map is drawn until every one is contractive; a map is chosen with probability
    proportional to its area scale ``|det A|``, so the points cover the attractor evenly."""
    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(classes):
        k = int(rng.integers(*MAPS))
        while True:
            a = rng.uniform(-1, 1, (k, 2, 2))
            t = rng.uniform(-1, 1, (k, 2))
            if np.linalg.svd(a, compute_uv=False).max() < MAX_GAIN:
                break
        det = np.abs(np.linalg.det(a))
        systems.append((a, t, det / det.sum()))
    return systems


def chaos_game(rng: np.random.Generator, a: np.ndarray, t: np.ndarray, p: np.ndarray,
               n: int) -> np.ndarray:
    """Points ``[n, STEPS - BURN_IN, 2]`` of ``n`` jittered copies of one IFS."""
    k = len(a)
    mats = a[None] * rng.uniform(1 - JITTER, 1 + JITTER, (n, k, 1, 1))
    shifts = t[None] + rng.normal(0, 0.05, (n, k, 2))
    rows = np.arange(n)
    x, y = np.zeros(n), np.zeros(n)
    points = np.empty((n, STEPS - BURN_IN, 2))
    for step in range(STEPS):
        idx = rng.choice(k, size=n, p=p)
        m, s = mats[rows, idx], shifts[rows, idx]
        x, y = m[:, 0, 0] * x + m[:, 0, 1] * y + s[:, 0], m[:, 1, 0] * x + m[:, 1, 1] * y + s[:, 1]
        if step >= BURN_IN:
            points[:, step - BURN_IN, 0], points[:, step - BURN_IN, 1] = x, y
    return points


def _render(rng: np.random.Generator, system, n: int, size: int) -> np.ndarray:
    """uint8 images ``[n, 3, size, size]`` of one class."""
    pts = chaos_game(rng, *system, n)
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    scale = rng.uniform(0.6, 1.0, (n, 1, 1))
    offset = rng.uniform(0, 1, (n, 1, 2)) * (1 - scale)
    unit = (pts - lo) / np.maximum(hi - lo, 1e-6) * scale + offset  # in [0, 1]
    pix = np.clip(np.rint(unit * (size - 1)).astype(np.int64), 0, size - 1)
    flat = (np.arange(n)[:, None] * size + pix[..., 1]) * size + pix[..., 0]
    density = np.log1p(np.bincount(flat.ravel(), minlength=n * size * size)
                       .reshape(n, size, size).astype(np.float64))
    density /= density.max(axis=(1, 2), keepdims=True)
    fore, back = rng.uniform(0.3, 1.0, (n, 3)), rng.uniform(0.0, 0.5, (n, 3))
    d = density[:, None]
    image = back[..., None, None] * (1 - d) + fore[..., None, None] * d
    image += rng.normal(0, 0.03, image.shape)
    flip = rng.random(n) < 0.5
    image[flip] = image[flip, :, :, ::-1]
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


@lru_cache(maxsize=4)  # the demo's stages read the dataset several times in one process
def _split_arrays(seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    systems = class_systems()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(FRACTALS_CLASSES))
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for c, system in enumerate(systems):
        rows = np.flatnonzero(labels == c)
        for i in range(0, len(rows), _CHUNK):
            chunk = rows[i:i + _CHUNK]
            images[chunk] = _render(rng, system, len(chunk), size)
    return images, labels


def _split(seed: int, n: int, size: int, name: str) -> ImageDataset:
    images, labels = _split_arrays(seed, n, size)  # copied: the cached arrays stay as built
    return ImageDataset(torch.tensor(images), torch.tensor(labels), list(FRACTALS_CLASSES),
                        name=name)


def load_fractals(image_size: int = FRACTALS_SIZE) -> tuple[ImageDataset, ImageDataset]:
    """The ``fractals`` dataset as ``(train, test)``: 3 channels, ``image_size``^2, 10
    classes, balanced; the same images on every machine."""
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 for fractals, got {image_size}")
    return (_split(FRACTALS_SEED + 1, FRACTALS_TRAIN, image_size, "fractals-train"),
            _split(FRACTALS_SEED + 2, FRACTALS_TEST, image_size, "fractals-test"))
