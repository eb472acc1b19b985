"""The embedded default dataset ``digits`` (no files, no network needed).

scikit-learn ships the UCI 8x8 handwritten digits (1,797 images, values 0..16). They are
scaled to uint8 0..255, upsampled to 16x16 with bilinear interpolation and split per
class into 80% train / 20% test with a fixed seed, so every run sees the same split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from robustkd.data.dataset import ImageDataset
from robustkd.errors import DataError

READER_VERSION = 1
DIGITS_SIZE = 16
DIGITS_SPLIT_SEED = 20240229
DIGITS_TEST_FRACTION = 0.2


def _stratified_test_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        n_test = int(round(fraction * len(idx)))
        mask[rng.permutation(idx)[:n_test]] = True
    return mask


def load_digits(image_size: int = DIGITS_SIZE) -> tuple[ImageDataset, ImageDataset]:
    """The ``digits`` dataset as ``(train, test)``: 1 channel, ``image_size``^2, classes 0..9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(
            "the 'digits' dataset needs scikit-learn (pip install scikit-learn)"
        ) from exc
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    bunch = sk_load_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)  # [N, 8, 8] in 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    x = torch.from_numpy(raw * (255.0 / 16.0)).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = x.round().clamp_(0, 255).to(torch.uint8)
    test_mask = _stratified_test_mask(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    classes = [str(i) for i in range(10)]
    train_idx = torch.from_numpy(np.flatnonzero(~test_mask))
    test_idx = torch.from_numpy(np.flatnonzero(test_mask))
    lab = torch.from_numpy(labels)
    return (
        ImageDataset(images[train_idx], lab[train_idx], list(classes), name="digits-train"),
        ImageDataset(images[test_idx], lab[test_idx], list(classes), name="digits-test"),
    )
