"""Typed jobs: what each command needs, as frozen dataclasses with one default per field.

A job is made of shared parts (data, optimisation, runtime) and the command's own fields;
every field is a :func:`~robustkd.settings.setting`, so the CLI flags, their help, the
validation where a value enters, config files and the records all come from here.

Two serial forms:

* ``job.to_dict()`` - nested, with ``schema`` and ``command``: what ``--print-config``
  writes and ``--config FILE`` reads (YAML or JSON).
* ``job.flat()`` / ``Job.from_flat(values)`` - the keyword arguments of ``robustkd.api``
  (one namespace per command; :func:`from_job` builds the job from them). The experiment
  harness names runs by the flat values it sets, so run ids stay what they were.

Only ``from_flat``/``from_dict`` build jobs from user input: unknown keys are an error that
names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from robustkd.errors import ConfigError
from robustkd.settings import make_settings, nearest, setting

SCHEMA_VERSION = 1
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class DataSpec:
    """Which images a command reads."""

    dataset: str | None = setting(None, "digits (embedded), cifar10, cifar100, gtsrb, "
                                        "flower17, tinyimagenet200, or any NAME with an "
                                        "ImageFolder layout in --data-root", metavar="NAME")
    data_root: str | None = setting(None, "folder holding NAME.tar.gz, NAME/{train,test}/"
                                          "<class>/… or the official CIFAR archives",
                                    metavar="DIR")
    image_size: int | None = setting(None, "resize images to this square size when "
                                           "decoding (streamed: the crop size)", minimum=1)
    train_fraction: float | None = setting(None, "deterministic per-class fraction of the "
                                                 "training set to use", above=0.0,
                                           maximum=1.0)
    download: bool = setting(False, "download the official CIFAR archive into --data-root "
                                    "if missing (checksum verified)")
    holdout: float | None = setting(None, "evaluate on this per-class fraction of the "
                                          "training set, held out (a validation split)",
                                    above=0.0, maximum=0.5)
    stream: bool = setting(False, "decode the data from disk batch by batch instead of "
                                  "loading it into memory (docs/streaming.md)")
    workers: int | None = setting(None, "decoding processes when streaming (default: CPU "
                                        "count, at most 8)", minimum=0)


@dataclass(frozen=True)
class OptimSpec:
    """How a model is trained."""

    epochs: int | None = setting(None, "training epochs", minimum=1)
    batch_size: int = setting(128, "batch size", minimum=1)
    lr: float | None = setting(None, "learning rate", above=0.0)
    optimizer: str = setting("sgd", "optimiser", choices=OPTIMIZERS)
    schedule: str | None = setting(None, "learning-rate schedule; step divides the lr by "
                                         "10 at 50% and 75% of the epochs",
                                   choices=SCHEDULES)
    weight_decay: float = setting(5e-4, "weight decay", minimum=0.0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0.0, maximum=1.0)
    eval_every: int = setting(1, "evaluate every N epochs (0: at the end)", minimum=0)


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a command runs; never part of what a run computes."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    seed: int = setting(0, "seed of initialisation, data order and augmentation", minimum=0)
    amp: bool = setting(True, "bf16 autocast on CUDA and on CPUs with native bf16")
    channels_last: bool | None = setting(None, "channels_last memory format (default on)")
    compile: bool = setting(False, "torch.compile the training step (distill: its loss)")
    progress: bool = setting(True, "progress bars")
    resume: bool = setting(False, "continue an interrupted run in --out")
    overwrite: bool = setting(False, "replace a finished (or unfinished) run in --out")


def _nested(default: Any) -> Any:
    return field(default_factory=lambda: default)


@dataclass(frozen=True)
class Job:
    """A command's inputs. Subclasses add their own fields and name their command."""

    command: ClassVar[str] = ""
    PARTS: ClassVar[tuple[str, ...]] = ()
    # keys of the shared parts this command does not take, and fields a user must give
    OMIT: ClassVar[tuple[str, ...]] = ()
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    # former key -> field: older API calls, config files and harness plans keep working
    RENAMED: ClassVar[dict[str, str]] = {}

    def flat(self) -> dict[str, Any]:
        """The API keyword arguments this job stands for."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.PARTS:
                out.update({k: v for k, v in dataclasses.asdict(value).items()
                            if k not in self.OMIT})
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """Nested, versioned and JSON/YAML-ready (tuples as lists)."""
        body: dict[str, Any] = {"schema": SCHEMA_VERSION, "command": self.command}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            body[f.name] = ({k: v for k, v in dataclasses.asdict(value).items()
                             if k not in self.OMIT} if f.name in self.PARTS else value)
        return json.loads(json.dumps(body, default=_jsonable))

    @classmethod
    def keys(cls) -> dict[str, str | None]:
        """Every flat key -> the part holding it (``None``: the job's own field)."""
        out: dict[str, str | None] = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.PARTS:
                out.update({g.name: f.name for g in dataclasses.fields(_part_type(cls, f))
                            if g.name not in cls.OMIT})
            else:
                out[f.name] = None
        return out

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> Job:
        """A job from API keyword arguments (``None`` is a value, as in the API); unknown
        keys name the nearest valid one."""
        keys = cls.keys()
        parts: dict[str, dict[str, Any]] = {p: {} for p in cls.PARTS}
        own: dict[str, Any] = {}
        for key, value in cls.renamed(values).items():
            if key not in keys:
                raise ConfigError(f"{cls.command} has no setting {key!r}"
                                  f"{nearest(key, list(keys))}")
            (parts[keys[key]] if keys[key] else own)[key] = _plain(value)
        missing = [k for k in cls.REQUIRED if not own.get(k)]
        if missing:
            raise ConfigError(f"{cls.command} needs {', '.join(missing)}")
        return cls._build(parts, own)

    @classmethod
    def renamed(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` with former keys under their current names."""
        out = dict(values)
        for old, new in cls.RENAMED.items():
            if old in out:
                if new in out:
                    raise ConfigError(f"{cls.command}: give {new!r} or its former name "
                                      f"{old!r}, not both")
                out[new] = out.pop(old)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        """A job from its nested form (a config file); checks schema and command."""
        data = dict(data)
        schema = data.pop("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ConfigError(f"config schema {schema} is not {SCHEMA_VERSION}; write it "
                              "again with --print-config")
        command = data.pop("command", cls.command)
        if command != cls.command:
            raise ConfigError(f"the config is for `{command}`, not `{cls.command}`")
        flat: dict[str, Any] = {}
        own = {f.name for f in dataclasses.fields(cls)}
        for key, value in cls.renamed(data).items():
            if key in cls.PARTS:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config key {key!r} must be a mapping")
                flat.update(value)
            elif key in own:
                flat[key] = value
            else:
                valid = [*own, "schema", "command"]
                raise ConfigError(f"config has no key {key!r}{nearest(key, valid)}")
        return cls.from_flat(flat)

    @classmethod
    def _build(cls, parts: dict[str, dict[str, Any]], own: dict[str, Any]) -> Job:
        kwargs: dict[str, Any] = {}
        base = cls()
        for name in cls.PARTS:
            default = getattr(base, name)
            merged = {**dataclasses.asdict(default), **parts[name]}
            kwargs[name] = make_settings(type(default), merged, cls.command,
                                         none_is_default=False, flags="")
        # the job's own fields are checked like any settings (the parts already are)
        return make_settings(cls, {**own, **kwargs}, cls.command, none_is_default=False,
                             flags="")


def _part_type(cls: type, f: dataclasses.Field) -> type:
    return type(getattr(cls(), f.name))


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not serialisable")


@dataclass(frozen=True)
class TrainJob(Job):
    """``robustkd train``: a clean classifier from scratch."""

    command: ClassVar[str] = "train"
    PARTS: ClassVar[tuple[str, ...]] = ("data", "optim", "runtime")

    data: DataSpec = _nested(DataSpec(dataset="digits"))
    optim: OptimSpec = _nested(OptimSpec(epochs=30, lr=0.1, schedule="step"))
    runtime: RuntimeSpec = _nested(RuntimeSpec())
    model: str = setting("wrn16_2", "architecture (see `robustkd models`)", metavar="NAME")
    model_kwargs: dict[str, Any] | None = None
    out: str = setting("runs/train", "run directory to write", metavar="DIR")


@dataclass(frozen=True)
class AttackJob(Job):
    """``robustkd attack``: poison-fine-tune a clean teacher, or train poisoned from scratch
    (epochs, lr and schedule then default to 8 / 0.008 / constant and 30 / 0.1 / step)."""

    command: ClassVar[str] = "attack"
    PARTS: ClassVar[tuple[str, ...]] = ("data", "optim", "runtime")
    OMIT: ClassVar[tuple[str, ...]] = ("stream", "workers")  # poisoning is in memory

    data: DataSpec = _nested(DataSpec())
    optim: OptimSpec = _nested(OptimSpec())
    runtime: RuntimeSpec = _nested(RuntimeSpec())
    attack: str = setting("badnets", "the attack (see --help for each one's settings)",
                          metavar="NAME")
    teacher: str | None = setting(None, "clean teacher run to poison-fine-tune",
                                  metavar="RUN_DIR")
    model: str | None = setting(None, "architecture to poison from scratch", metavar="NAME")
    trigger_teacher: str | None = setting(None, "from scratch: clean run a learned trigger is "
                                                "optimised on", metavar="RUN_DIR")
    target: int = setting(0, "target class index", minimum=0)
    poison_ratio: float = setting(0.02, "fraction of each non-target class triggered and "
                                        "relabelled", above=0.0, maximum=1.0)
    keep_originals: bool = setting(True, "keep the poisoned images' clean originals")
    allow_partial: bool = setting(False, "use an unfinished teacher run's last checkpoint "
                                         "(recorded in the run's config)")
    options: dict[str, Any] | None = None
    out: str = setting("runs/attack", "run directory to write", metavar="DIR")


@dataclass(frozen=True)
class DistillJob(Job):
    """``robustkd distill``: a student from a (possibly backdoored) teacher on clean data."""

    command: ClassVar[str] = "distill"
    PARTS: ClassVar[tuple[str, ...]] = ("data", "optim", "runtime")
    # the defender's data is clean_fraction
    OMIT: ClassVar[tuple[str, ...]] = ("train_fraction", "download")

    data: DataSpec = _nested(DataSpec())
    optim: OptimSpec = _nested(OptimSpec(epochs=200, lr=0.1, schedule="step"))
    runtime: RuntimeSpec = _nested(RuntimeSpec())
    method: str = setting("fkd", "distillation method", metavar="NAME")
    teacher: str | None = setting(None, "teacher run directory", metavar="RUN_DIR")
    teacher_factory: str | None = setting(None, "build your own teacher nn.Module",
                                          metavar="MODULE:FUNC")
    teacher_weights: str | None = setting(None, "weights for the teacher factory",
                                          metavar="FILE")
    teacher_layers: tuple[str, ...] | None = setting(None, "teacher modules to distil",
                                                     metavar="A,B,C")
    student: str | None = setting("wrn16_1", "student architecture", metavar="NAME")
    student_factory: str | None = setting(None, "build your own student nn.Module",
                                          metavar="MODULE:FUNC")
    student_layers: tuple[str, ...] | None = setting(None, "student modules to distil",
                                                     metavar="A,B,C")
    allow_pickle: bool = setting(False, "accept pickle teacher weights (weights_only=True)")
    allow_partial: bool = setting(False, "use an unfinished teacher run's last checkpoint "
                                         "(recorded in the run's config)")
    trigger_from: str | None = setting(None, "measure ASR with this run's trigger",
                                       metavar="RUN_DIR")
    clean_fraction: float | None = setting(None, "per-class fraction of the clean training "
                                                 "set the defender holds", above=0.0,
                                           maximum=1.0)
    clean_seed: int | None = setting(None, "seed choosing the defender's clean images "
                                           "(default: the run's seed)", minimum=0)
    clean_val: float | None = setting(None, "hold out this per-class share of the clean "
                                            "images and evaluate on it instead of the test "
                                            "set (a validation split for choosing settings)",
                                      above=0.0, maximum=0.5)
    options: dict[str, Any] | None = None
    robustkd: dict[str, Any] | None = None
    defense: str | None = setting(None, "teacher defence to run first", metavar="NAME")
    defense_options: dict[str, Any] | None = None
    detox_from: str | None = setting(None, "reuse an earlier robustkd run's detox masks",
                                     metavar="RUN_DIR")
    out: str = setting("runs/student", "run directory to write", metavar="DIR")


@dataclass(frozen=True)
class EvaluateJob(Job):
    """``robustkd evaluate``: ACC, ASR and optionally feature variance of a run."""

    command: ClassVar[str] = "evaluate"
    REQUIRED: ClassVar[tuple[str, ...]] = ("run",)
    RENAMED: ClassVar[dict[str, str]] = {"model_dir": "run"}

    run: str = setting("", "run directory of the model to evaluate", metavar="RUN_DIR")
    dataset: str | None = setting(None, "override the run's dataset", metavar="NAME")
    data_root: str | None = setting(None, "data folder", metavar="DIR")
    trigger_from: str | None = setting(None, "measure ASR with another run's trigger",
                                       metavar="RUN_DIR")
    feature_samples: int = setting(0, "also report feature variance on N test images",
                                   minimum=0)
    batch_size: int = setting(256, "batch size", minimum=1)
    seed: int = setting(0, "seed", minimum=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    out: str | None = setting(None, "folder to write record.json to (default: "
                                    "<run>/evaluation)", metavar="DIR")
    workers: int | None = setting(None, "decoding processes for streamed data", minimum=0)


@dataclass(frozen=True)
class ScanJob(Job):
    """``robustkd scan``: per-layer feature-variance statistics (paper Fig. 2)."""

    command: ClassVar[str] = "scan"
    REQUIRED: ClassVar[tuple[str, ...]] = ("run",)
    RENAMED: ClassVar[dict[str, str]] = {"model_dir": "run", "samples": "feature_samples"}

    run: str = setting("", "run directory of the model to scan", metavar="RUN_DIR")
    reference: str | None = setting(None, "run directory of a model to compare against",
                                    metavar="RUN_DIR")
    feature_samples: int = setting(100, "clean test images to measure feature variance on "
                                        "(paper: 100)", minimum=2)
    dataset: str | None = setting(None, "override the run's dataset", metavar="NAME")
    data_root: str | None = setting(None, "data folder", metavar="DIR")
    seed: int = setting(0, "seed", minimum=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    out: str | None = setting(None, "folder to write the scan to (default: <run>/scan)",
                              metavar="DIR")


@dataclass(frozen=True)
class DefendJob(Job):
    """``robustkd defend``: a finished model (a teacher, or a student already distilled)
    cleaned by a registered defence on the defender's clean data, as a new run."""

    command: ClassVar[str] = "defend"
    PARTS: ClassVar[tuple[str, ...]] = ("runtime",)
    OMIT: ClassVar[tuple[str, ...]] = ("compile",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("run",)

    runtime: RuntimeSpec = _nested(RuntimeSpec())
    run: str = setting("", "run directory of the model to clean", metavar="RUN_DIR")
    defense: str = setting("anp", "defence to run", metavar="NAME")
    options: dict[str, Any] | None = None
    data_root: str | None = setting(None, "data folder (default: the run's)", metavar="DIR")
    clean_fraction: float | None = setting(None, "per-class fraction of the clean training "
                                                 "set the defender holds (default: all)",
                                           above=0.0, maximum=1.0)
    clean_seed: int | None = setting(None, "seed choosing the defender's clean images "
                                           "(default: --seed)", minimum=0)
    out: str = setting("runs/defended", "run directory to write", metavar="DIR")


@dataclass(frozen=True)
class ImportJob(Job):
    """``robustkd import``: an external weights file as a run directory."""

    command: ClassVar[str] = "import"
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "weights")

    model: str = setting("", "architecture the weights belong to", metavar="NAME")
    weights: str = setting("", ".safetensors (or .pt/.pth with allow_pickle)", metavar="FILE")
    dataset: str = setting("digits", "dataset the model classifies", metavar="NAME")
    data_root: str | None = setting(None, "data folder", metavar="DIR")
    image_size: int | None = setting(None, "resize images to this size", minimum=1)
    allow_pickle: bool = setting(False, "accept a pickle checkpoint (weights_only=True)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    seed: int = setting(0, "seed", minimum=0)
    overwrite: bool = setting(False, "replace a finished run in --out")
    out: str = setting("runs/imported", "run directory to write", metavar="DIR")


JOBS: dict[str, type[Job]] = {j.command: j for j in (TrainJob, AttackJob, DistillJob,
                                                      EvaluateJob, ScanJob, ImportJob,
                                                      DefendJob)}


def from_job(job: type[Job]) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Turn ``fn(job)`` into the API function taking ``job``'s fields as keywords: callers'
    values are checked and completed by the job (its defaults are the only ones), ``fn``
    gets the job, and the API function's signature shows the keywords."""

    def deco(fn: Callable[[Any], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            return fn(job.from_flat(kwargs))

        run.job_type = job  # type: ignore[attr-defined]  # what a caller may build beforehand
        kind = inspect.Parameter.KEYWORD_ONLY
        run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(k, kind, default=inspect.Parameter.empty if k in job.REQUIRED
                               else v) for k, v in job().flat().items()])
        return run

    return deco


def read_config(path: str | Path) -> dict[str, Any]:
    """A job's nested form from a YAML (or JSON) file."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --config {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {p} must hold a mapping of settings")
    return dict(data)


def to_yaml(job: Job) -> str:
    import yaml

    return yaml.safe_dump(job.to_dict(), sort_keys=False)
