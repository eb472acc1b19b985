"""The generated dataset ``shapes`` (no files, no network needed).

Ten classes of filled shapes (disk, ring, square, frame, diamond, plus, cross, triangle,
wide and tall ellipse) in random colour, position and size on colour backgrounds that
carry random sinusoidal gratings (the shapes carry them too, in grey, at a quarter of the
strength). The gratings make texture something every model must read past, as in natural
images, so that a trigger made of stripes lies inside what a student learns from its
teacher on clean images: the condition under which backdoors crossed distillation on
CIFAR-10 (on this data none did; docs/RESULTS.md). The images are a pure function of each
split's fixed seed, so every machine builds the same dataset.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from robustkd.data.dataset import ImageDataset
from robustkd.errors import DataError

SHAPES_SIZE = 32
SHAPES_TRAIN = 10_000
SHAPES_TEST = 2_000
SHAPES_SEED = 20_261_206
SHAPES_CLASSES = ("disk", "ring", "square", "frame", "diamond", "plus", "cross", "triangle",
                  "wide-ellipse", "tall-ellipse")
GRATINGS = 2  # sinusoidal gratings summed into every background
_CHUNK = 1024


def _masks(label: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Boolean masks [N, S, S] of each image's shape; ``dx``/``dy`` are offsets from the
    shape's centre in units of its radius."""
    ax, ay = dx.abs(), dy.abs()
    box = torch.maximum(ax, ay)
    r = (dx * dx + dy * dy).sqrt()
    u, v = (dx - dy).abs() / math.sqrt(2), (dx + dy).abs() / math.sqrt(2)
    per_class = torch.stack([
        r < 1.0,
        (r < 1.0) & (r > 0.55),
        box < 0.85,
        (box < 0.9) & (box > 0.5),
        ax + ay < 1.1,
        ((ax < 0.32) & (ay < 1.0)) | ((ay < 0.32) & (ax < 1.0)),
        ((u < 0.3) & (v < 1.05)) | ((v < 0.3) & (u < 1.05)),
        (dy < 0.75) & (dy > 1.8 * ax - 1.0),
        (dx / 1.05) ** 2 + (dy / 0.45) ** 2 < 1.0,
        (dx / 0.45) ** 2 + (dy / 1.05) ** 2 < 1.0,
    ])  # [10, N, S, S]
    return per_class[label, torch.arange(len(label))]


def _render(rng: np.random.Generator, labels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images [N, 3, size, size] of the given labels."""
    n = len(labels)
    g = lambda *shape: torch.from_numpy(rng.random(shape, dtype=np.float32))  # noqa: E731
    base = 0.2 + 0.6 * g(n, 3)
    theta, freq, phase = math.pi * g(n, GRATINGS), 1.0 + 7.0 * g(n, GRATINGS), \
        2 * math.pi * g(n, GRATINGS)
    amp = 0.05 + 0.2 * g(n, GRATINGS)
    tint = 2 * g(n, GRATINGS, 3) - 1
    centre = (0.32 + 0.36 * g(n, 2)) * size
    radius = (0.2 + 0.12 * g(n, 1)) * size
    fore = g(n, 3)
    fore = torch.where((fore - base).abs() < 0.25, (fore + 0.5) % 1.0, fore)
    noise = torch.from_numpy(rng.normal(0, 0.03, (n, 3, size, size)).astype(np.float32))

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # in (0, 1)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = (xx[None, None] * torch.cos(theta)[..., None, None]
            + yy[None, None] * torch.sin(theta)[..., None, None])  # [N, G, S, S]
    waves = amp[..., None, None] * torch.sin(2 * math.pi * freq[..., None, None] * proj
                                             + phase[..., None, None])
    background = base[..., None, None] + torch.einsum("ngc,nghw->nchw", tint, waves)
    px = torch.arange(size, dtype=torch.float32) + 0.5
    dx = (px[None, None, :] - centre[:, 0, None, None]) / radius[:, :, None]
    dy = (px[None, :, None] - centre[:, 1, None, None]) / radius[:, :, None]
    mask = _masks(torch.from_numpy(labels), dx, dy)[:, None]  # [N, 1, S, S]
    foreground = fore[..., None, None] + 0.25 * waves.sum(1, keepdim=True)  # textured too
    image = torch.where(mask, foreground, background) + noise
    return (image.clamp_(0, 1) * 255).round().to(torch.uint8)


def _split(seed: int, n: int, size: int, name: str) -> ImageDataset:
    labels = np.arange(n, dtype=np.int64) % len(SHAPES_CLASSES)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(labels)
    images = torch.cat([_render(rng, labels[i:i + _CHUNK], size)
                        for i in range(0, n, _CHUNK)])
    return ImageDataset(images, torch.from_numpy(labels), list(SHAPES_CLASSES), name=name)


def load_shapes(image_size: int = SHAPES_SIZE) -> tuple[ImageDataset, ImageDataset]:
    """The ``shapes`` dataset as ``(train, test)``: 3 channels, ``image_size``^2, 10 classes,
    balanced; the same images on every machine."""
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 for shapes, got {image_size}")
    return (_split(SHAPES_SEED, SHAPES_TRAIN, image_size, "shapes-train"),
            _split(SHAPES_SEED + 1, SHAPES_TEST, image_size, "shapes-test"))
