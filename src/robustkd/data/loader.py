"""Batches from a device-resident uint8 dataset, with batched on-device augmentation.

Host-to-device copies of the (small) per-batch random offsets are ``non_blocking`` so the
loop never waits for the GPU queue to drain.

:class:`DeviceLoader` copies a dataset's uint8 images to the device once and yields
``(x, y, idx)`` batches: ``x`` float32 normalised ``[B, C, H, W]``, ``y`` int64 labels
(on the device) and ``idx`` the dataset row of each sample (int64, on the CPU, so it can
index CPU tensors such as ``ds.is_poison`` and device tensors alike).

Reproducibility: every pass over the data draws its order and its augmentation from
one ``torch.Generator`` (on the CPU) seeded with ``(seed, epoch)``. The epoch is set by
:meth:`DeviceLoader.set_epoch` or advances by one with every pass, so a resumed run
that calls ``set_epoch(e)`` sees exactly the batches the original run saw in epoch ``e``,
on any device.

Augmentation policies (``augment`` dicts, as ``DatasetSplits.augment`` gives them):

* ``{"kind": "crop", "pad": p, "flip": bool}`` - zero-pad by ``p`` and crop back to
  ``H x W`` at a random per-sample offset; horizontal flip with probability 0.5.
* ``{"kind": "resized_crop", "scale": [lo, hi], "ratio": [r0, r1], "flip": bool}`` - crop
  a random area fraction in ``scale`` with aspect ratio in ``ratio`` (default
  ``[3/4, 4/3]``, log-uniform) and resize it to ``H x W`` (bilinear, batched with
  ``affine_grid``/``grid_sample``); horizontal flip with probability 0.5.
* ``{"kind": "flip"}`` - horizontal flip only; ``None``/``{}``/``{"kind": "none"}`` - none.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError

_KINDS = ("none", "crop", "resized_crop", "flip")


def _stat_tensor(
    values: Sequence[float] | torch.Tensor | float, like: torch.Tensor
) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1) if t.dim() else t


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x - mean) / std`` per channel, ``x`` in [0, 1] as ``[B, C, H, W]`` or ``[C, H, W]``."""
    return (x - _stat_tensor(mean, x)) / _stat_tensor(std, x)


def denormalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] pixel space."""
    return x * _stat_tensor(std, x) + _stat_tensor(mean, x)


def check_augment(augment: dict | None) -> dict | None:
    """Validate an augmentation policy; returns a normalised copy (``None`` = no augmentation)."""
    if not augment:
        return None
    if not isinstance(augment, dict):
        raise ConfigError(f"augment must be a dict, got {type(augment).__name__}")
    kind = augment.get("kind", "none")
    if kind not in _KINDS:
        raise ConfigError(f"unknown augmentation kind {kind!r}; expected one of {list(_KINDS)}")
    if kind == "none":
        return None
    out = dict(augment)
    out["flip"] = bool(augment.get("flip", kind == "flip"))
    if kind == "crop":
        pad = augment.get("pad", 0)
        if not isinstance(pad, int) or pad < 0:
            raise ConfigError(f"crop augmentation: pad must be an int >= 0, got {pad!r}")
    elif kind == "resized_crop":
        lo, hi = (float(v) for v in augment.get("scale", (0.08, 1.0)))
        r0, r1 = (float(v) for v in augment.get("ratio", (3 / 4, 4 / 3)))
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"resized_crop: scale must satisfy 0 < lo <= hi <= 1, got {[lo, hi]}")
        if not 0.0 < r0 <= r1:
            raise ConfigError(f"resized_crop: ratio must satisfy 0 < r0 <= r1, got {[r0, r1]}")
        out["scale"], out["ratio"] = [lo, hi], [r0, r1]
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed derived from ``(seed, epoch)``."""
    digest = hashlib.sha256(f"robustkd-loader:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random pad-and-crop (+ flip) of a ``[B, C, H, W]`` batch via one gather."""
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = oy[:, None] + torch.arange(h)  # [B, H]
    cols = ox[:, None] + torch.arange(w)  # [B, W]
    if flip:
        flips = torch.rand(b, generator=g) < 0.5
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)
    flat = flat.to(dev, non_blocking=True)
    out = x.reshape(b, c, hp * wp).gather(2, flat.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flips = torch.rand(x.shape[0], generator=g) < 0.5
    flips = flips.to(x.device, non_blocking=True)
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def _resized_crop(
    x: torch.Tensor, scale: Sequence[float], ratio: Sequence[float], flip: bool, g: torch.Generator
) -> torch.Tensor:
    """Random-resized-crop of a float ``[B, C, H, W]`` batch with one ``grid_sample``."""
    b, _, h, w = x.shape
    area = torch.empty(b, dtype=torch.float64).uniform_(scale[0], scale[1], generator=g)
    log_r = torch.empty(b, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=g
    )
    r = torch.exp(log_r)
    # crop width / height as fractions of the image width / height
    sw = torch.sqrt(area * r * h / w).clamp(max=1.0)
    sh = torch.sqrt(area / r * w / h).clamp(max=1.0)
    cx = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * (1 - sh)
    sx = sw
    if flip:
        flips = torch.rand(b, generator=g) < 0.5
        sx = torch.where(flips, -sw, sw)
    zero = torch.zeros(b, dtype=torch.float64)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1).to(
        device=x.device, dtype=x.dtype, non_blocking=True
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(x_u8: torch.Tensor, augment: dict | None, g: torch.Generator) -> torch.Tensor:
    """Apply a (checked) policy to a uint8 batch; returns float32 in [0, 1]."""
    kind = augment["kind"] if augment else "none"
    if kind == "crop":
        x_u8 = _crop_flip(x_u8, augment["pad"], augment["flip"], g)
    x = x_u8.float().div_(255.0)
    if kind == "resized_crop":
        x = _resized_crop(x, augment["scale"], augment["ratio"], augment["flip"], g)
    elif kind == "flip" and augment["flip"]:
        x = _flip(x, g)
    return x


class EpochBatches:
    """What every loader the training loop consumes shares: an epoch counter that fixes the
    next pass's order and augmentation, and batch/sample counts. Subclasses set
    ``dataset``, ``batch_size``, ``drop_last`` and ``epoch``."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch``'s order and augmentation (then ``epoch + 1``, ...)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)


class DeviceLoader(EpochBatches):
    """Iterate ``(x, y, idx)`` batches of an :class:`ImageDataset` kept on ``device``.

    ``mean``/``std`` default to no normalisation (0 and 1). ``len(loader)`` is the number
    of batches per pass.
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        shuffle: bool = False,
        augment: dict | None = None,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = ds
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.augment = check_augment(augment)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        ch = ds.channels
        mean = (0.0,) * ch if mean is None else tuple(float(m) for m in mean)
        std = (1.0,) * ch if std is None else tuple(float(s) for s in std)
        if len(mean) not in (1, ch) or len(std) not in (1, ch):
            raise ConfigError(
                f"mean/std have {len(mean)}/{len(std)} values but the images have {ch} channels"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.epoch = 0

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (CPU int64), without consuming anything."""
        return self._order(self._generator(epoch))

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(epoch_seed(self.seed, epoch))

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.dataset)
        return torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batch_rows(self, g: torch.Generator) -> list[torch.Tensor]:
        """The rows of each batch of one pass, in order (CPU int64)."""
        order = self._order(g)
        n, bs = len(order), self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        return [order[start : start + bs] for start in range(0, stop, bs)]

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = self._generator(epoch)
        for idx in self._batch_rows(g):
            idx_dev = idx.to(self.device, non_blocking=True)
            x = augment_batch(self.images.index_select(0, idx_dev), self.augment, g)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, idx_dev), idx


class GroupedLoader(DeviceLoader):
    """A :class:`DeviceLoader` whose every batch holds rows of one group only (``groups``:
    one integer per row), in shuffled order: what a cross-fitted teacher needs, each batch
    read by the copy that never trained on its group, with BN statistics over a whole batch.

    Each group's rows are shuffled and cut into batches (``drop_last`` drops each group's
    partial batch), then the batches of all groups are shuffled together.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, *, groups: torch.Tensor,
                 **kwargs) -> None:
        super().__init__(ds, batch_size, **kwargs)
        groups = torch.as_tensor(groups, dtype=torch.long).cpu()
        if groups.shape != (len(ds),):
            raise ConfigError(f"groups must give one group per row: {len(ds)} rows, "
                              f"groups of shape {tuple(groups.shape)}")
        self.groups = groups
        self._members = [torch.nonzero(groups == k).flatten() for k in groups.unique()]

    def __len__(self) -> int:
        bs = self.batch_size
        return sum(len(m) // bs if self.drop_last else -(-len(m) // bs) for m in self._members)

    def _order(self, g: torch.Generator) -> torch.Tensor:
        return torch.cat(self._batch_rows(g)) if len(self) else torch.zeros(0, dtype=torch.long)

    def _batch_rows(self, g: torch.Generator) -> list[torch.Tensor]:
        bs, batches = self.batch_size, []
        for rows in self._members:
            if self.shuffle:
                rows = rows[torch.randperm(len(rows), generator=g)]
            stop = (len(rows) // bs) * bs if self.drop_last else len(rows)
            batches += [rows[start : start + bs] for start in range(0, stop, bs)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def group_of(self, idx: torch.Tensor) -> int:
        """The group of a batch's rows (one group per batch by construction)."""
        return int(self.groups[idx[0]])
