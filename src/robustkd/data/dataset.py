"""The in-memory dataset type every reader produces and every consumer takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustkd.errors import DataError


@dataclass
class ImageDataset:
    """Decoded images as one uint8 tensor, so augmentation and triggers run batched on a device.

    ``images`` is ``[N, C, H, W]`` uint8, ``labels`` is ``[N]`` int64 in ``[0, len(classes))``.
    ``is_poison`` marks images an attack modified (all False for clean data).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    is_poison: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be a uint8 tensor [N, C, H, W], "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but labels have shape "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)
        ):
            bad = self.labels[(self.labels < 0) | (self.labels >= len(self.classes))][0]
            raise DataError(
                f"{self.name}: label {int(bad)} is out of range for {len(self.classes)} classes "
                f"(valid labels are 0..{len(self.classes) - 1})"
            )
        if self.is_poison is None:
            self.is_poison = torch.zeros(len(self.labels), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageDataset:
        """A new dataset holding the rows in ``index`` (a view-free copy)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            classes=list(self.classes),
            name=name or self.name,
            is_poison=self.is_poison[index],
        )


@dataclass
class DatasetSplits:
    """Train and test splits of one dataset plus what a model needs to consume them.

    ``mean``/``std`` are per-channel statistics of the training images in [0, 1]; the
    loader normalises with them. ``augment`` names the default training augmentation
    policy (see :mod:`robustkd.data.loader`).
    """

    train: ImageDataset
    test: ImageDataset
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: dict = field(default_factory=dict)
    source: str = ""
    # fraction of each training class held out as ``test`` (a validation split), or None
    holdout: float | None = None

    def __post_init__(self) -> None:
        if self.train.classes != self.test.classes:
            only_train = sorted(set(self.train.classes) - set(self.test.classes))
            only_test = sorted(set(self.test.classes) - set(self.train.classes))
            raise DataError(
                f"{self.name}: train and test class sets differ "
                f"(only in train: {only_train[:5]}, only in test: {only_test[:5]})"
            )
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.train.images.shape[1:])} but "
                f"test images are {tuple(self.test.images.shape[1:])}"
            )

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes
