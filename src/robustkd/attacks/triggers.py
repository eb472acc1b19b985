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
        try:
            pattern, mask = tensors["trigger.pattern"], tensors["trigger.mask"]
        except KeyError as exc:
            raise ConfigError("the checkpoint metadata names a trigger but its tensors "
                              f"are missing ({exc.args[0]})") from None
        return cls(pattern, mask, kind=config.get("kind", "custom"),
                   params=config.get("params", {}))


def checkerboard(size: int, channels: int = 1) -> torch.Tensor:
    """The classic BadNets black-and-white square."""
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2
    return grid.float().expand(channels, size, size).clone()


def patch_trigger(image_size: tuple[int, int], channels: int = 3, size: int = 3,
                  position: str | tuple[int, int] = "br", margin: int = 1,
                  pattern: str | torch.Tensor = "checkerboard", seed: int = 0) -> Trigger:
    """BadNets: paste a ``size``x``size`` patch at a corner (or ``(row, col)``)."""
    h, w = image_size
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
    if isinstance(pattern, torch.Tensor):
        tile = pattern.float()
        if tile.dim() == 2:
            tile = tile[None]
        if tile.shape[-2:] != (size, size):
            raise ConfigError(f"patch pattern is {tuple(tile.shape)}, expected [C, {size}, {size}]")
    elif pattern == "checkerboard":
        tile = checkerboard(size, 1)
    elif pattern == "white":
        tile = torch.ones(1, size, size)
    elif pattern == "random":
        gen = torch.Generator().manual_seed(seed)
        tile = torch.rand(channels, size, size, generator=gen).round()
    else:
        raise ConfigError(f"unknown patch pattern {pattern!r} (checkerboard, white, random)")
    full = torch.zeros(tile.shape[0], h, w)
    full[:, row:row + size, col:col + size] = tile
    mask = torch.zeros(1, h, w)
    mask[:, row:row + size, col:col + size] = 1.0
    params = {"size": size, "position": [row, col], "pattern": pattern
              if isinstance(pattern, str) else "tensor", "seed": seed}
    return Trigger(full, mask, kind="patch", params=params)


def blend_trigger(image_size: tuple[int, int], channels: int = 3, alpha: float = 0.15,
                  pattern: str | torch.Tensor = "noise", seed: int = 0) -> Trigger:
    """Blended (Chen et al.): ``(1 - alpha) * x + alpha * pattern`` over the whole image."""
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"blend alpha must be in (0, 1], got {alpha}")
    h, w = image_size
    if isinstance(pattern, torch.Tensor):
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
    mask = torch.full((1, h, w), float(alpha))
    params = {"alpha": alpha, "pattern": pattern if isinstance(pattern, str) else "image",
              "seed": seed}
    return Trigger(full.clamp(0, 1), mask, kind="blend", params=params)
