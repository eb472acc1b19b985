"""Settings dataclasses: the one place a component's defaults live.

Every attack, teacher defence and distillation method owns a frozen dataclass whose fields
are its settings. A field made with :func:`setting` carries its help text and its valid
range as metadata, so the CLI flags, their help (with the default), the validation of a
value where it enters and the error naming the nearest valid key all come from the same
declaration. Only the settings a user gives are stored in records and run ids (the
defaults are filled in here), so a run's identity does not change when a default of an
unrelated setting does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from robustkd.errors import ConfigError

_META = "robustkd"


def setting(default: Any, help: str, *, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None,
            choices: Sequence[Any] | None = None, metavar: str | None = None,
            parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its CLI help and valid range (``minimum``/``maximum``
    inclusive, ``above`` exclusive); ``None`` is always allowed where it is the default.
    ``parse`` reads the value from text (a flag, a config string) instead of its type."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "above": above,
            "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
            "parse": parse}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata={_META: meta})


def setting_meta(f: dataclasses.Field) -> dict[str, Any]:
    """The help, range and parsing a :func:`setting` field declares (empty otherwise)."""
    return f.metadata.get(_META, {})


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(hint: Any) -> tuple[type | None, bool]:
    """``(scalar type, is a tuple)`` of a field's annotation (``None`` allowed around it)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return base_type(args[0]) if len(args) == 1 else (None, False)
    if origin is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return (args[0] if args else None), True
    return (hint if isinstance(hint, type) else None), False


def _coerce(key: str, value: Any, hint: Any, what: str) -> Any:
    scalar, is_tuple = base_type(hint)
    if value is None:
        return None
    if is_tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) \
            else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{what}: {key} takes a list, got {value!r}")
        return tuple(_coerce(key, v, scalar, what) for v in items)
    if isinstance(value, bool) and scalar in (int, float):
        raise ConfigError(f"{what}: {key} must be a {scalar.__name__}, got {value!r}")
    try:
        if scalar is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if scalar is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if scalar is float:
            return float(value)
        if scalar is str:
            return str(value)
    except (TypeError, ValueError):
        name = scalar.__name__ if scalar else "value"
        raise ConfigError(f"{what}: {key} must be a {name}, got {value!r}") from None
    return value


def check_value(key: str, value: Any, meta: Mapping[str, Any], what: str) -> None:
    """Range and choice checks of one setting; the message names the setting."""
    if value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{what}: {key} must be one of {list(meta['choices'])}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ConfigError(f"{what}: {key} must be a finite number, got {v!r}")
            lo, hi, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
            if lo is not None and v < lo:
                raise ConfigError(f"{what}: {key} must be >= {lo}, got {v!r}")
            if above is not None and v <= above:
                raise ConfigError(f"{what}: {key} must be > {above}, got {v!r}")
            if hi is not None and v > hi:
                raise ConfigError(f"{what}: {key} must be <= {hi}, got {v!r}")


def nearest(key: str, valid: Sequence[str]) -> str:
    """`` (did you mean X?)`` for a misspelt key, or an empty string."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_settings(cls: type, options: Mapping[str, Any] | None, what: str, *,
                  none_is_default: bool = True, flags: str | None = None) -> Any:
    """``cls`` from its defaults plus ``options``: unknown keys name the nearest valid one;
    values are converted to the field's type and range-checked. With ``none_is_default`` a
    ``None`` value means "not given" (a CLI flag left out, an old record's placeholder).
    ``flags`` names the settings' command-line flags in errors: ``""`` for a job's own
    (``lr (--lr)``), a registry entry's name for its settings (``beta (--fkd-beta)``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    values: dict[str, Any] = {}
    for key, value in (options or {}).items():
        key = str(key).replace("-", "_")
        if key not in fields:
            raise ConfigError(f"{what} has no setting {key!r}{nearest(key, list(fields))}; "
                              f"it takes {sorted(fields)}")
        if value is None and none_is_default and fields[key].default is not None:
            continue  # None means "not given": the default applies
        shown = key if flags is None else f"{key} ({flag_name(flags, key)})"
        parse = setting_meta(fields[key]).get("parse")
        if parse is not None and isinstance(value, str):
            try:
                value = parse(value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{what}: {shown}: {exc}") from None
        values[key] = _coerce(shown, value, hints[key], what)
        check_value(shown, values[key], setting_meta(fields[key]), what)
    return cls(**values)



def settings_dict(obj: Any) -> dict[str, Any]:
    """Every setting with its value (tuples as lists: what JSON records hold)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def flag_name(entry: str, name: str) -> str:
    """``--<entry>-<setting>`` (a setting already named after its entry is not doubled);
    ``--<setting>`` for a command's own setting (``entry`` empty)."""
    stem = entry.replace("-", "_")
    key = name if not stem or name.startswith(stem + "_") else f"{stem}_{name}"
    return "--" + key.replace("_", "-")


def add_entry_flags(parser: argparse.ArgumentParser, entries: Mapping[str, type], *,
                    choose: str) -> dict[str, tuple[str, str]]:
    """One group of flags per registry entry (``--<entry>-<setting>``), help with the
    default, default ``None`` so only the flags a user gives override the entry's defaults.
    ``choose`` is the flag picking the entry (for the group titles). Returns
    ``dest -> (entry, setting name)``."""
    dests: dict[str, tuple[str, str]] = {}
    for entry, cls in entries.items():
        fields = [f for f in dataclasses.fields(cls) if _META in f.metadata]
        if not fields:
            continue
        group = parser.add_argument_group(f"{choose} {entry} settings")
        hints = field_types(cls)
        for f in fields:
            flag = flag_name(entry, f.name)
            dest = flag[2:].replace("-", "_")
            dests[dest] = (entry, f.name)
            group.add_argument(flag, dest=dest, default=None, **flag_kwargs(f, hints[f.name]))
    return dests


def flag_kwargs(f: dataclasses.Field, hint: Any, default: Any = dataclasses.MISSING
                ) -> dict[str, Any]:
    """argparse keywords of one setting's flag: help with the default (``default``, when
    given, is the one the command uses), type, choices, metavar."""
    meta = setting_meta(f)
    text = meta.get("help", "")
    shown = f.default if default is dataclasses.MISSING else default
    if shown is None:
        suffix = "" if "default" in text else " (default: not set)"
    else:
        suffix = f" (default {_shown(shown)})"
    kwargs: dict[str, Any] = {"help": (text + suffix).replace("%", "%%")}  # argparse formats it
    scalar, is_tuple = base_type(hint)
    if meta.get("parse") is not None:
        kwargs["type"] = meta["parse"]
    elif scalar is bool and not is_tuple:
        kwargs.update(type=_parse_bool, metavar="true|false")
    elif scalar in (int, float) and not is_tuple:
        kwargs["type"] = scalar
    if meta.get("choices") is not None and not is_tuple:
        kwargs["choices"] = list(meta["choices"])
    elif meta.get("metavar") or is_tuple:
        kwargs["metavar"] = meta.get("metavar") or "A,B,…"
    elif scalar in (int, float):
        kwargs["metavar"] = "N" if scalar is int else "X"
    return kwargs


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_shown, value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def entry_options(args: argparse.Namespace, dests: Mapping[str, tuple[str, str]],
                  chosen: str | Sequence[str] | None, *, choose: str) -> dict[str, Any]:
    """The settings a user gave for the chosen entry (or entries); a flag of another entry
    is an error naming the entry it belongs to."""
    chosen_set = {chosen} if isinstance(chosen, str) else set(chosen or ())
    out: dict[str, Any] = {}
    for dest, (entry, name) in dests.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if entry not in chosen_set:
            now = (f"not {', '.join(sorted(chosen_set))}" if chosen_set
                   else f"and {choose} is not given")
            raise ConfigError(f"{flag_name(entry, name)} applies to {choose} {entry}, {now}")
        out[name] = value
    return out


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
