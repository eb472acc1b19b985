"""PNG renderings of a trigger (pattern, mask, triggered examples) for a human to inspect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from robustkd.io import atomic_write
from robustkd.triggers import Trigger


def _to_image(x: torch.Tensor, scale: int) -> Image.Image:
    """``[C, H, W]`` float in [0, 1] -> PIL image enlarged ``scale`` times (nearest)."""
    arr = (x.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _save(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def render_trigger(trigger: Trigger, examples: torch.Tensor, out_dir: str | Path,
                   scale: int | None = None) -> list[Path]:
    """Write ``trigger_pattern.png``, ``trigger_mask.png`` (max mask value = white) and
    ``trigger_examples.png`` (clean images on top, triggered below)."""
    out = Path(out_dir)
    h, _ = trigger.image_size
    scale = scale or max(1, 128 // h)
    mask = trigger.mask.detach()
    mask_img = mask / mask.max().clamp_min(1e-8)
    x = examples.float().div(255).to(trigger.pattern.device)
    triggered = trigger.apply(x)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(triggered), dim=2)], dim=1)
    paths = [out / "trigger_pattern.png", out / "trigger_mask.png", out / "trigger_examples.png"]
    _save(_to_image(trigger.pattern, scale), paths[0])
    _save(_to_image(mask_img[:1], scale), paths[1])
    _save(_to_image(grid, max(1, scale // 2)), paths[2])
    return paths
