"""Triggers as batched tensor objects.

Every trigger here is a masked blend ``x' = (1 - M) * x + M * P`` on images in [0, 1]:
a BadNets patch is a binary mask over a small square, Blended is a constant mask ``alpha``
over the whole image, and learned triggers (CKD, LBA) optimise ``P`` and ``M``. One class
therefore serves all of them, runs on whole batches on any device, and serialises to
JSON (what it is) plus two tensors (pattern, mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError

CORNERS = {"br", "bl", "tr", "tl", "center"}
REFERENCE_SIZE = 32  # image side at which patch sizes and blend patterns are specified


class Trigger(nn.Module):
    """A masked-blend trigger with pattern ``[C|1, H, W]`` and mask ``[1|C, H, W]`` in [0, 1]."""

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, kind: str = "custom",
                 params: dict[str, Any] | None = None, learnable: bool = False) -> None:
        super().__init__()
        if pattern.dim() != 3 or mask.dim() != 3:
            raise ConfigError("trigger pattern and mask must be [C, H, W] tensors")
        if pattern.shape[-2:] != mask.shape[-2:]:
            raise ConfigError(f"trigger pattern {tuple(pattern.shape)} and mask "
                              f"{tuple(mask.shape)} differ in size")
        pattern, mask = pattern.float(), mask.float()
        if learnable:
            self.pattern = nn.Parameter(pattern)
            self.mask = nn.Parameter(mask)
        else:
            self.register_buffer("pattern", pattern)
            self.register_buffer("mask", mask)
        self.kind = kind
        self.params = dict(params or {})

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.pattern.shape[-2]), int(self.pattern.shape[-1])

    def check_images(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ConfigError(f"{self.kind} trigger is for {self.image_size[0]}x"
                              f"{self.image_size[1]} images, got {x.shape[-2]}x{x.shape[-1]}")
        for t in (self.pattern, self.mask):
            if t.shape[0] not in (1, x.shape[1]):
                raise ConfigError(f"{self.kind} trigger has {t.shape[0]} channels, "
                                  f"images have {x.shape[1]}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a float batch ``[B, C, H, W]`` in [0, 1]."""
        self.check_images(x)
        mask = self.mask.to(x.dtype)
        return (1 - mask) * x + mask * self.pattern.to(x.dtype)

    forward = apply

    @torch.no_grad()
    def apply_uint8(self, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Trigger uint8 images and quantise back, as a poisoned image file would be stored."""
        out = torch.empty_like(images)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].float().div_(255)
            chunk = self.apply(chunk.to(self.pattern.device))
            out[start:start + batch_size] = chunk.mul_(255).round_().clamp_(0, 255).to(
                images.device, torch.uint8)
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params, "image_size": list(self.image_size)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"trigger.pattern": self.pattern.detach(), "trigger.mask": self.mask.detach()}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Trigger:
        """Rebuild a saved trigger; ``config["placement"]`` picks the subclass that saved it."""
        placement = config.get("placement", "fixed")
        if cls is Trigger and placement != "fixed":
            if placement not in PLACEMENTS:
                raise ConfigError(f"unknown trigger placement {placement!r} in the checkpoint "
                                  f"metadata (known: fixed, {', '.join(sorted(PLACEMENTS))})")
            return PLACEMENTS[placement].from_saved(config, tensors)
        pattern, mask = _saved_tensors(tensors)
        return cls(pattern, mask, kind=config.get("kind", "custom"),
                   params=config.get("params", {}))


def _saved_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return tensors["trigger.pattern"], tensors["trigger.mask"]
    except KeyError as exc:
        raise ConfigError("the checkpoint metadata names a trigger but its tensors "
                          f"are missing ({exc.args[0]})") from None


class RandomPatchTrigger(Trigger):
    """A small patch pasted at a random position of every image (HTBA's test-time trigger).

    ``pattern``/``mask`` hold only the ``[C|1, s, s]`` tile, so the same tensors save to
    safetensors as for any trigger; ``config()`` adds ``placement: random`` and the image
    size so :meth:`Trigger.from_saved` rebuilds this class. Positions come from a generator
    seeded with ``seed`` unless one is passed, so ASR evaluations are reproducible.
    """

    placement = "random"

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor | None = None, *,
                 image_size: tuple[int, int], kind: str = "random-patch",
                 params: dict[str, Any] | None = None, seed: int = 0) -> None:
        if mask is None:
            mask = torch.ones(1, *pattern.shape[-2:])
        super().__init__(pattern, mask, kind=kind, params=params)
        h, w = int(image_size[0]), int(image_size[1])
        s = self.patch_size
        if self.pattern.shape[-2] != self.pattern.shape[-1] or s > min(h, w):
            raise ConfigError(f"a random patch must be square and fit the {h}x{w} images, got "
                              f"{tuple(self.pattern.shape[-2:])}")
        self._image_size = (h, w)
        self.seed = int(seed)
        self.params.setdefault("seed", self.seed)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def patch_size(self) -> int:
        return int(self.pattern.shape[-1])

    def positions(self, batch: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left ``(rows, cols)`` of the patch for ``batch`` images (CPU int64)."""
        gen = generator or torch.Generator().manual_seed(self.seed)
        h, w = self.image_size
        s = self.patch_size
        rows = torch.randint(0, h - s + 1, (batch,), generator=gen)
        cols = torch.randint(0, w - s + 1, (batch,), generator=gen)
        return rows, cols

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None,
              positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Paste the tile at a random (or the given) position of each image of the batch."""
        self.check_images(x)
        b, s = x.shape[0], self.patch_size
        h, w = self.image_size
        rows, cols = positions if positions is not None else self.positions(b, generator)
        rows, cols = rows.to(x.device), cols.to(x.device)
        i = torch.arange(h, device=x.device)[None, :, None] - rows[:, None, None]  # [B, H, 1]
        j = torch.arange(w, device=x.device)[None, None, :] - cols[:, None, None]  # [B, 1, W]
        inside = ((i >= 0) & (i < s) & (j >= 0) & (j < s)).to(x.dtype)  # [B, H, W]
        ii, jj = i.clamp(0, s - 1).expand(b, h, w), j.clamp(0, s - 1).expand(b, h, w)
        pattern = self.pattern.to(x.dtype)[:, ii, jj].transpose(0, 1)  # [B, C|1, H, W]
        mask = self.mask.to(x.dtype)[:, ii, jj].transpose(0, 1) * inside[:, None]
        return (1 - mask) * x + mask * pattern

    forward = apply

    def config(self) -> dict[str, Any]:
        return {**super().config(), "placement": self.placement}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                   ) -> RandomPatchTrigger:
        pattern, mask = _saved_tensors(tensors)
        params = dict(config.get("params", {}))
        size = config.get("image_size")
        if not size:
            raise ConfigError("a saved random-patch trigger needs its image_size")
        return cls(pattern, mask, image_size=tuple(size), kind=config.get("kind", "random-patch"),
                   params=params, seed=int(params.get("seed", 0)))


class AdditiveTrigger(Trigger):
    """A signal added to the whole image and clipped to [0, 1]: ``clip(x + v)`` (SIG's
    sinusoid), which no masked blend expresses. ``pattern`` holds ``v`` (values may be
    negative); ``mask`` is all ones, kept so the tensors save like any trigger's."""

    placement = "additive"

    def __init__(self, signal: torch.Tensor, mask: torch.Tensor | None = None, *,
                 kind: str = "additive", params: dict[str, Any] | None = None) -> None:
        if mask is None:
            mask = torch.ones(1, *signal.shape[-2:])
        super().__init__(signal, mask, kind=kind, params=params)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a float batch ``[B, C, H, W]`` in [0, 1]."""
        self.check_images(x)
        return (x + self.pattern.to(x.dtype)).clamp(0.0, 1.0)

    forward = apply

    def config(self) -> dict[str, Any]:
        return {**super().config(), "placement": self.placement}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                   ) -> AdditiveTrigger:
        signal, mask = _saved_tensors(tensors)
        return cls(signal, mask, kind=config.get("kind", "additive"),
                   params=config.get("params", {}))


PLACEMENTS: dict[str, type[Trigger]] = {"random": RandomPatchTrigger,
                                        "additive": AdditiveTrigger}


def checkerboard(size: int, channels: int = 1) -> torch.Tensor:
    """The classic BadNets black-and-white square."""
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2
    return grid.float().expand(channels, size, size).clone()


def patch_tile(size: int, channels: int = 3, pattern: str | torch.Tensor = "checkerboard",
               seed: int = 0) -> torch.Tensor:
    """The ``[C|1, size, size]`` patch content (checkerboard, white, random binary, or given)."""
    if isinstance(pattern, torch.Tensor):
        tile = pattern.float()
        if tile.dim() == 2:
            tile = tile[None]
        if tile.shape[-2:] != (size, size):
            raise ConfigError(f"patch pattern is {tuple(tile.shape)}, expected [C, {size}, {size}]")
        return tile
    if pattern == "checkerboard":
        return checkerboard(size, 1)
    if pattern == "white":
        return torch.ones(1, size, size)
    if pattern == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(channels, size, size, generator=gen).round()
    raise ConfigError(f"unknown patch pattern {pattern!r} (checkerboard, white, random)")


def random_patch_trigger(image_size: tuple[int, int], channels: int = 3, size: int = 3,
                         pattern: str | torch.Tensor = "checkerboard", seed: int = 0,
                         kind: str = "random-patch",
                         reference_size: int | None = REFERENCE_SIZE) -> RandomPatchTrigger:
    """A ``size``x``size`` patch pasted at a random position per image (HTBA).

    ``size`` is in pixels of a ``reference_size`` image and grows with larger images like
    :func:`patch_trigger`'s (tile enlarged nearest-neighbour, so its cells keep their look).
    """
    h, w = image_size
    if size < 1:
        raise ConfigError(f"patch size must be >= 1, got {size}")
    tile = patch_tile(size, channels, pattern, seed)
    requested = size
    size = max(1, _scaled(size, trigger_scale(image_size, reference_size)))
    if size > min(h, w):
        raise ConfigError(f"patch size {size} does not fit {h}x{w} images")
    if tile.shape[-1] != size:
        tile = torch.nn.functional.interpolate(tile[None], size=(size, size), mode="nearest")[0]
    params = {"size": size, "position": "random",
              "pattern": pattern if isinstance(pattern, str) else "tensor", "seed": seed}
    if size != requested:
        params["requested_size"] = requested
    return RandomPatchTrigger(tile, image_size=(h, w), kind=kind, params=params, seed=seed)




def trigger_scale(image_size: tuple[int, int], reference_size: int | None = REFERENCE_SIZE
                  ) -> float:
    """How much a trigger specified for ``reference_size`` px images grows on these images.

    The rule: lengths given for 32x32 images (patch side, margin, position, blend-pattern
    detail) scale with the image's shorter side, so a trigger covers the same fraction of a
    64 or 224 px image as of a CIFAR image and survives the resizing of the data pipeline.
    Images no larger than the reference use the lengths as given (a 3 px patch on 16 px
    digits stays 3 px); ``reference_size=None`` turns scaling off.
    """
    if reference_size is None:
        return 1.0
    if reference_size < 1:
        raise ConfigError(f"trigger reference_size must be a positive int, got {reference_size}")
    return max(1.0, min(image_size) / reference_size)


def _scaled(length: int, factor: float) -> int:
    return int(round(length * factor)) if factor != 1.0 else int(length)


def patch_trigger(image_size: tuple[int, int], channels: int = 3, size: int = 3,
                  position: str | tuple[int, int] = "br", margin: int = 1,
                  pattern: str | torch.Tensor = "checkerboard", seed: int = 0,
                  reference_size: int | None = REFERENCE_SIZE) -> Trigger:
    """BadNets: paste a ``size``x``size`` patch at a corner (or ``(row, col)``).

    ``size``, ``margin`` and a ``(row, col)`` position are in pixels of a ``reference_size``
    image and scale with larger images (:func:`trigger_scale`); the tile is enlarged with
    nearest-neighbour sampling, so a checkerboard keeps its cells (3x3 at 32 px -> 21x21 of
    7x7 cells at 224 px) instead of becoming an invisible 1 px grid.
    """
    h, w = image_size
    requested = size
    factor = trigger_scale(image_size, reference_size)
    tile = None
    if size >= 1:
        tile = patch_tile(size, channels, pattern, seed)
        size = max(1, _scaled(size, factor))
    margin = _scaled(margin, factor)
    if not isinstance(position, str):
        position = (_scaled(int(position[0]), factor), _scaled(int(position[1]), factor))
    if tile is not None and tile.shape[-1] != size:
        tile = torch.nn.functional.interpolate(tile[None], size=(size, size), mode="nearest")[0]
    if size < 1 or size + margin > min(h, w):
        raise ConfigError(f"patch size {size} with margin {margin} does not fit {h}x{w} images")
    if isinstance(position, str):
        if position not in CORNERS:
            raise ConfigError(f"patch position {position!r} must be one of {sorted(CORNERS)} "
                              "or a (row, col) pair")
        if position == "center":
            row, col = (h - size) // 2, (w - size) // 2
        else:
            row = margin if position[0] == "t" else h - size - margin
            col = margin if position[1] == "l" else w - size - margin
    else:
        row, col = int(position[0]), int(position[1])
        if not (0 <= row <= h - size and 0 <= col <= w - size):
            raise ConfigError(f"patch at ({row}, {col}) of size {size} leaves the {h}x{w} image")
    full = torch.zeros(tile.shape[0], h, w)
    full[:, row:row + size, col:col + size] = tile
    mask = torch.zeros(1, h, w)
    mask[:, row:row + size, col:col + size] = 1.0
    params = {"size": requested, "position": [row, col], "pattern": pattern
              if isinstance(pattern, str) else "tensor", "seed": seed}
    if factor != 1.0:
        params.update(side=size, reference_size=reference_size)
    return Trigger(full, mask, kind="patch", params=params)


def blend_trigger(image_size: tuple[int, int], channels: int = 3, alpha: float = 0.15,
                  pattern: str | torch.Tensor = "noise", seed: int = 0,
                  reference_size: int | None = REFERENCE_SIZE) -> Trigger:
    """Blended (Chen et al.): ``(1 - alpha) * x + alpha * pattern`` over the whole image.

    Generated patterns (noise, stripes) are drawn on a grid whose shorter side is
    ``reference_size`` and resized bilinearly to larger images (:func:`trigger_scale`), so a
    seed gives the same pattern at every image size, only smoother; an image pattern is
    resized bilinearly to the image size as it is.
    """
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"blend alpha must be in (0, 1], got {alpha}")
    out_h, out_w = image_size
    factor = trigger_scale(image_size, reference_size)
    h, w = (out_h, out_w) if factor == 1.0 else (max(1, _scaled(out_h, 1 / factor)),
                                                  max(1, _scaled(out_w, 1 / factor)))
    if isinstance(pattern, torch.Tensor):
        h, w = out_h, out_w
        full = pattern.float()
        if full.dim() == 2:
            full = full[None]
        if tuple(full.shape[-2:]) != (h, w):
            full = torch.nn.functional.interpolate(full[None], size=(h, w), mode="bilinear",
                                                   align_corners=False)[0]
    elif pattern == "noise":
        full = torch.rand(channels, h, w, generator=torch.Generator().manual_seed(seed))
    elif pattern == "stripes":
        full = (torch.arange(w) % 4 < 2).float().expand(channels, h, w).clone()
    else:
        raise ConfigError(f"unknown blend pattern {pattern!r} (noise, stripes, or an image)")
    if (h, w) != (out_h, out_w):
        full = torch.nn.functional.interpolate(full[None], size=(out_h, out_w), mode="bilinear",
                                               align_corners=False)[0]
    mask = torch.full((1, out_h, out_w), float(alpha))
    params = {"alpha": alpha, "pattern": pattern if isinstance(pattern, str) else "image",
              "seed": seed}
    if factor != 1.0 and isinstance(pattern, str):
        params["reference_size"] = reference_size
    return Trigger(full.clamp(0, 1), mask, kind="blend", params=params)


def rescale_trigger(trigger: Trigger, image_size: tuple[int, int]) -> Trigger:
    """The same fixed-position trigger for images of another size (pattern and mask resized).

    For a trigger that exists only as tensors (a learned CKD/LBA trigger, one loaded from a
    run) and must be applied to images of a different resolution. Patch triggers are resized
    with nearest-neighbour sampling (the mask stays binary), all others bilinearly (with
    antialiasing when shrinking). To *build* a trigger for a size, prefer
    :func:`patch_trigger`/:func:`blend_trigger`, which follow the same rule exactly.
    """
    if getattr(trigger, "placement", "fixed") != "fixed":
        raise ConfigError(f"cannot rescale a {trigger.kind} trigger with "
                          f"{trigger.placement} placement; rebuild it for {image_size}")
    h, w = int(image_size[0]), int(image_size[1])
    if (h, w) == trigger.image_size:
        return trigger
    if trigger.kind == "patch":
        def resize(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(t[None], size=(h, w), mode="nearest")[0]
    else:
        def resize(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(t[None], size=(h, w), mode="bilinear",
                                                   align_corners=False, antialias=True)[0]
    with torch.no_grad():
        pattern, mask = resize(trigger.pattern.detach().float()), resize(trigger.mask.detach())
    params = {**trigger.params, "rescaled_from": list(trigger.image_size)}
    return Trigger(pattern.clamp(0, 1), mask.float().clamp(0, 1), kind=trigger.kind,
                   params=params)
