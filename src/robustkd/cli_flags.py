"""Command-line flags generated from the typed jobs, and the job a command line means.

Every field of a job (:mod:`robustkd.jobs`) becomes one flag with its help and the default
the command uses; flags default to ``None`` so that only what a user types overrides
``--config FILE`` (a whole job in YAML or JSON, as ``--print-config`` writes it), which in
turn overrides the job's defaults. Booleans that default on get a ``--no-<name>`` flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from robustkd.errors import ConfigError
from robustkd.jobs import JOBS, Job, read_config
from robustkd.settings import base_type, field_types, flag_kwargs, flag_name, setting_meta

GROUPS = {"data": "data", "optim": "training", "runtime": "run"}


def add_job_flags(p: argparse.ArgumentParser, job: type[Job], *,
                  skip: Iterable[str] = (), choices: Mapping[str, Iterable[str]] | None = None,
                  required: Iterable[str] = ()) -> None:
    """One flag per field of ``job`` (but ``skip``: flags the command declares itself),
    plus ``--config`` and ``--print-config``. ``required`` fields must come from a flag or
    the config file."""
    skip, choices = set(skip), dict(choices or {})
    base = job()
    hints = field_types(job)
    for f in dataclasses.fields(job):
        if f.name in job.PARTS:
            part = getattr(base, f.name)
            group = p.add_argument_group(GROUPS[f.name])
            part_hints = field_types(type(part))
            for g in dataclasses.fields(part):
                if g.name not in job.OMIT and g.name not in skip:
                    _add(group, g, part_hints[g.name], getattr(part, g.name), choices)
        elif f.metadata and f.name not in skip:
            required_here = f.name in set(required)
            _add(p, f, hints[f.name], None if required_here else getattr(base, f.name),
                 choices, required_here)
    for old, new in job.RENAMED.items():  # a former spelling still works, with a notice
        p.add_argument(flag_name("", old), dest=new, action=_Renamed,
                       default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("job file")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="read the whole job from a YAML/JSON file (as --print-config writes "
                        "it); flags given here override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the effective job as YAML and exit without running it")
    p.set_defaults(_job=job.command, _job_required=tuple(required))


class _Renamed(argparse.Action):
    """A flag's former spelling: stores the value under the new name and says so."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"robustkd: note: {option_string} is now {flag_name('', self.dest)}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add(group: Any, f: dataclasses.Field, hint: Any, default: Any,
         choices: Mapping[str, Iterable[str]], required: bool = False) -> None:
    flag = flag_name("", f.name)
    scalar, is_tuple = base_type(hint)
    if scalar is bool and not is_tuple:
        text = setting_meta(f).get("help", "").replace("%", "%%")
        if default is False:
            group.add_argument(flag, dest=f.name, action="store_const", const=True,
                               default=None, help=text)
        else:  # on by default (None: on unless turned off)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const",
                               const=False, default=None, help=f"turn off: {text}")
        return
    kwargs = flag_kwargs(f, hint, default)
    if required:
        kwargs["help"] = kwargs["help"].replace(" (default: not set)", "") + " (required)"
    if f.name in choices:
        kwargs["choices"] = sorted(choices[f.name])
        kwargs.pop("metavar", None)
    group.add_argument(flag, dest=f.name, default=None, **kwargs)


def job_from_args(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Job:
    """The job of a parsed command line: defaults, then ``--config``, then the flags given,
    then ``extra`` (values the command computed from other flags; dicts merge key-wise)."""
    job = JOBS[args._job]
    merged: dict[str, Any] = {}
    if args.config:
        merged.update(job.from_dict(read_config(args.config)).flat())
    keys = job.keys()
    merged.update({k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        elif value is not None or key not in merged:
            merged[key] = value
    missing = [k for k in args._job_required if merged.get(k) in (None, "")]
    if missing:
        flags = ", ".join(flag_name("", k) for k in missing)
        raise ConfigError(f"{flags} is required (give it as a flag or in --config)")
    return job.from_flat(merged)
