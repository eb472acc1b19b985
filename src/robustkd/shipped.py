"""Backdoored teachers shipped with the package, for the demo: the user's real situation is a
teacher downloaded from somewhere, and training one that carries a backdoor across
distillation takes longer than a demo should.

Each is a run directory of the benchmark (the command that built it is in its
``meta.json`` under ``shipped``) with its weights in float16 (1.4 MB for a WRN-16-2).
:func:`materialise` writes it out as an ordinary run directory that every command reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load

from robustkd.errors import ConfigError, DataError
from robustkd.io import META_FILE, WEIGHTS_FILE, read_json, save_tensors, write_json

SHIPPED_WEIGHTS = "model.fp16.safetensors"


@dataclass(frozen=True)
class ShippedTeacher:
    name: str
    folder: str  # under robustkd/assets
    dataset: str
    label: str  # what a table calls it
    description: str


# Blended-stripes on CIFAR-10: of the benchmark's admitted teachers, the one whose backdoor
# crossed FKD on every seed while the default removed it on every seed (docs/RESULTS.md,
# session 25); on the generated fractals: the make-demo teacher (session 29)
SHIPPED_TEACHERS = {t.name: t for t in (
    ShippedTeacher("blended-stripes-fractals", "blended-stripes-fractals-wrn16_2", "fractals",
                   "Blended-stripes teacher",
                   "WRN-16-2 on the generated fractals with a Blended backdoor of stripes "
                   "(alpha 0.2, target 0, fractal-0)"),
    ShippedTeacher("blended-stripes-cifar10", "blended-stripes-cifar10-wrn16_2", "cifar10",
                   "Blended-stripes teacher",
                   "WRN-16-2 on CIFAR-10 with a Blended backdoor of stripes (alpha 0.3, "
                   "target 0, airplane)"),
)}


EXACT_PREFIX = "extra."  # trigger tensors: tiny, and they define the backdoor: kept exact


def to_float16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating weights in float16, the trigger's tensors exact (refused where a value would
    overflow float16)."""
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not key.startswith(EXACT_PREFIX):
            half = value.to(torch.float16)
            if not torch.isfinite(half).all():
                raise DataError(f"{key}: values outside the float16 range; it cannot ship "
                                "as float16")
            value = half
        out[key] = value
    return out


def widen(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 tensors back to float32 (exactly), the rest as they are."""
    return {k: v.to(torch.float32) if v.dtype == torch.float16 else v for k, v in tensors.items()}


def shipped_teacher(name: str) -> ShippedTeacher:
    if name not in SHIPPED_TEACHERS:
        raise ConfigError(f"no shipped teacher {name!r}; shipped: {sorted(SHIPPED_TEACHERS)}")
    return SHIPPED_TEACHERS[name]


def asset_folder(teacher: ShippedTeacher) -> Path:
    """Where the installed package keeps ``teacher``."""
    return Path(str(resources.files("robustkd") / "assets" / teacher.folder))


def materialise(name: str, out: str | Path) -> Path:
    """Write shipped teacher ``name`` to ``out`` as a run directory (float32 weights,
    ``meta.json``); a directory that already holds it is reused, anything else refused."""
    folder = asset_folder(shipped_teacher(name))
    meta = read_json(folder / META_FILE)
    raw = (folder / SHIPPED_WEIGHTS).read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta["shipped"]["sha256"]:
        raise DataError(f"the shipped teacher {name} is damaged (its weights do not match "
                        "their checksum); reinstall robustkd")
    out = Path(out)
    if (out / META_FILE).exists():
        if read_json(out / META_FILE).get("shipped") != meta["shipped"]:
            raise ConfigError(f"{out} holds another run; choose another --out")
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose another --out")
    weights = widen(load(raw))
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS_FILE, weights)
    write_json(out / META_FILE, meta)  # last: a directory with its meta is complete
    return out
