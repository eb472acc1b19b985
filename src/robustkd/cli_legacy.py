"""The flag spellings before settings were generated per entry (kept for one release).

Each old flag maps to a setting of whichever entry the command line chose (``--alpha`` to
the chosen attack's ``alpha``), is hidden from ``--help``, and prints a one-line notice
naming the new flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from robustkd.errors import ConfigError
from robustkd.settings import flag_name

ATTACK = {f"--{n.replace('_', '-')}": n for n in (
    "alpha", "blend_pattern", "patch_size", "patch_position", "patch_pattern", "trigger_seed",
    "mask_max", "trigger_lr", "trigger_epochs", "trigger_images", "feature_layers",
    "toxic_fraction", "variance_weight", "variance_layer", "variance_on")}
METHOD = {"--temperature": "temperature", "--beta": "beta", "--teacher-bn": "teacher_bn",
          "--spatial": "spatial", "--input-noise": "input_noise"}
ROBUSTKD = {f"--{n.replace('_', '-')}": n for n in (
    "tau", "taus", "selection", "epsilon", "lam", "detox_epochs", "detox_lr", "mask_init",
    "mask_shape", "open_weight", "consistency", "inversion_epochs", "inversion_mask_max",
    "inversion_classes", "outlier_z")} | {"--mask-variant": "variant", "--layers": "layers",
                                          "--detox-loss": "loss"}
DEFENSE = {"--defense-epochs": "epochs", "--defense-lr": "lr",
           "--defense-batch-size": "batch_size", "--defense-weight-decay": "weight_decay",
           "--nad-power": "p"}


def add_legacy_flags(p: argparse.ArgumentParser, group: str,
                     flags: Mapping[str, str]) -> None:
    for flag, name in flags.items():
        p.add_argument(flag, dest=f"_legacy_{group}_{name}", default=None, help=argparse.SUPPRESS)


def add_defense_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defense-set", action="append", default=None, help=argparse.SUPPRESS)


def legacy_options(args: argparse.Namespace, group: str, entry: str | None) -> dict[str, Any]:
    """The old flags given for ``group``, as settings of ``entry`` (with a notice)."""
    prefix = f"_legacy_{group}_"
    out = {}
    for dest, value in vars(args).items():
        if dest.startswith(prefix) and value is not None:
            name = dest[len(prefix):]
            if entry is None:
                raise ConfigError(f"the old flag for {name} does not apply to the chosen "
                                  f"{group}; its setting is now {flag_name('<entry>', name)}")
            print(f"robustkd: note: the old flag for {name} is now "
                  f"{flag_name(entry, name)}", file=sys.stderr)
            out[name] = value
    if group == "defense":
        for item in getattr(args, "defense_set", None) or ():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--defense-set takes KEY=VALUE, got {item!r}")
            if entry is None:
                raise ConfigError("--defense-set needs --defense NAME")
            print(f"robustkd: note: --defense-set {key} is now "
                  f"{flag_name(entry, key.strip().replace('-', '_'))}", file=sys.stderr)
            out[key.strip().replace("-", "_")] = _value(value.strip())
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
