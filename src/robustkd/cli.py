"""The ``robustkd`` command. Thin: parse arguments, call :mod:`robustkd.api`, print results."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from robustkd import __version__
from robustkd import cli_legacy as legacy
from robustkd.cli_flags import add_job_flags, job_from_args
from robustkd.cli_legacy import add_legacy_flags
from robustkd.errors import ConfigError, RobustKDError, UnsafeCheckpointError
from robustkd.jobs import (
    AttackJob,
    DefendJob,
    DistillJob,
    EvaluateJob,
    ImportJob,
    ScanJob,
    TrainJob,
    to_yaml,
)
from robustkd.settings import add_entry_flags, entry_options


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    from robustkd.attacks import ATTACKS
    from robustkd.demo import DATASETS as DEMO_DATASETS
    from robustkd.demo import DemoSettings

    parser = argparse.ArgumentParser(
        prog="robustkd",
        description="Robust knowledge distillation: distil a possibly backdoored teacher "
                    "into a small student that keeps its accuracy but not its backdoor.")
    parser.add_argument("--version", action="version", version=f"robustkd {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (put before the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a clean classifier (teacher or baseline)",
                       description="Train a clean classifier from scratch and write RUN_DIR.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "example:\n  robustkd train --dataset cifar10 --data-root DATA "
                           "--model wrn16_2 --epochs 30 --out runs/teacher\n"
                           "  robustkd train --config examples/train.yaml --seed 1"))
    add_job_flags(p, TrainJob, required=("out",))

    p = sub.add_parser("attack", help="implant a backdoor into a teacher",
                       description="Poison-fine-tune a clean teacher (--teacher RUN_DIR) or "
                                   "train a poisoned model from scratch (--model NAME). "
                                   "Fine-tuning defaults: 8 epochs, lr 0.008, constant; from "
                                   "scratch: 30 epochs, lr 0.1, step.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  robustkd attack --attack badnets --teacher "
                           "runs/teacher --out runs/badnets\n  robustkd attack --attack ckd "
                           "--model wrn16_2 --dataset cifar10 --data-root DATA "
                           "--trigger-teacher runs/teacher --out runs/ckd"))
    add_job_flags(p, AttackJob, choices={"attack": ATTACKS}, required=("attack", "out"))
    p.set_defaults(_attack_flags=add_entry_flags(
        p, {name: spec.settings for name, spec in sorted(ATTACKS.items())}, choose="--attack"))
    add_legacy_flags(p, "attack", legacy.ATTACK)

    p = sub.add_parser("distill", help="distil a teacher into a student on clean data",
                       description="Train a student from a (possibly backdoored) teacher on the "
                                   "clean training data or the defender's clean subset; reports "
                                   "ACC, and ASR under the teacher's trigger when it is known. "
                                   "--method robustkd runs the default preset "
                                   "(--robustkd-preset); the `robustkd` column of `reproduce` "
                                   "is the paper preset.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  robustkd distill --method robustkd --teacher "
                           "runs/ckd --student wrn16_1 --clean-fraction 0.2 --out runs/s\n"
                           "  robustkd distill --defense anp --anp-iterations 500 --teacher "
                           "runs/ckd --out runs/anp"))
    from robustkd.defenses import TEACHER_DEFENSES, transform_names
    from robustkd.distill import METHODS

    add_job_flags(p, DistillJob, skip=("detox_from",), required=("out",),
                  choices={"method": [*METHODS, *transform_names("method")],
                           "defense": TEACHER_DEFENSES})
    p.add_argument("--pair", default=None, metavar="TEACHER-STUDENT",
                   help="a teacher->student pair of the paper's Table 2 (sets --student and "
                        "checks the --teacher run's architecture): wrn28_4-wrn16_4, "
                        "wrn28_4-wrn28_2, wrn28_4-wrn16_2, wrn28_4-resnet56, "
                        "pyramidnet200-wrn28_4, pyramidnet200-pyramidnet110")
    from robustkd.defenses.robustkd import DEFAULT_PRESET, PRESETS, RobustKDConfig

    p.set_defaults(_method_flags=add_entry_flags(
        p, {name: cls.settings for name, cls in sorted(METHODS.items())}, choose="--method"))
    g = p.add_argument_group(
        "--method robustkd: detoxification, trigger synthesis, then FKD from the detoxified "
        "teacher (the --fkd-* settings apply to that FKD)")
    g.add_argument("--robustkd-preset", default=None, choices=sorted(PRESETS),
                   help=f"named configuration the --robustkd-* settings override "
                        f"(default {DEFAULT_PRESET}; paper = the literal reading; "
                        f"docs/RESULTS.md)")
    g.add_argument("--detox-from", default=None, metavar="RUN_DIR",
                   help="reuse the detox masks (and synthetic triggers) of an earlier robustkd "
                        "run with the same teacher instead of training new ones")
    p.set_defaults(_robustkd_flags=add_entry_flags(p, {"robustkd": RobustKDConfig},
                                                   choose="--method"))
    p.set_defaults(_defense_flags=add_entry_flags(
        p, {name: d.settings for name, d in sorted(TEACHER_DEFENSES.items())},
        choose="--defense"))
    add_legacy_flags(p, "method", legacy.METHOD)
    add_legacy_flags(p, "robustkd", legacy.ROBUSTKD)
    add_legacy_flags(p, "defense", legacy.DEFENSE)
    legacy.add_defense_set(p)
    p.add_argument("--robustkd-config", dest="robustkd_preset", default=None,
                   help=argparse.SUPPRESS)

    p = sub.add_parser("defend", help="clean a finished model with a defence, as a new run",
                       description="Run a defence (ANP pruning, fine-tuning, NAD, I-BAU) on a "
                                   "copy of a finished model - a downloaded teacher, or a "
                                   "student already distilled - on the defender's clean data, "
                                   "and write the cleaned model to OUT with its ACC (and ASR "
                                   "when the run's or its teacher's trigger is known) before "
                                   "and after. The run itself is never modified.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "example:\n  robustkd defend --run runs/student --defense anp "
                           "--anp-iterations 150 --clean-fraction 0.2 --out runs/student-anp"))
    add_job_flags(p, DefendJob, required=("run", "out"), choices={"defense": TEACHER_DEFENSES})
    p.set_defaults(_defense_flags=add_entry_flags(
        p, {name: d.settings for name, d in sorted(TEACHER_DEFENSES.items())},
        choose="--defense"))

    p = sub.add_parser("evaluate", help="ACC / ASR / feature variance of a run",
                       description="Evaluate a run directory on its dataset's test split.")
    add_job_flags(p, EvaluateJob, required=("run",))

    p = sub.add_parser("import", help="turn an external weights file into a run directory",
                       description="Load a teacher's weights (e.g. downloaded from a model hub) "
                                   "into a built-in architecture, evaluate it, and write RUN_DIR "
                                   "as safetensors. Pickle files are refused unless "
                                   "--allow-pickle is given.")
    add_job_flags(p, ImportJob, required=("model", "weights", "out"))

    p = sub.add_parser("scan", help="feature-variance statistics of a model (paper Fig. 2)",
                       description="Per-layer per-example feature variance on clean test "
                                   "images; with --reference, the ratio to another model with "
                                   "a bootstrap interval, and a histogram PNG.")
    add_job_flags(p, ScanJob, required=("run",))

    p = sub.add_parser("models", help="list architectures with parameter counts")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("datasets", help="list known datasets or verify a data folder")
    p.add_argument("action", choices=["list", "verify"], nargs="?", default="list")
    p.add_argument("--data-root", default=None)

    p = sub.add_parser("demo", help="the main job: a backdoor crossing FKD, and RobustKD "
                                    "removing it",
                       description="Distil a backdoored teacher shipped with robustkd (trained "
                                   "on the generated fractals data, no files needed) into a "
                                   "student with FKD and with RobustKD, and print ACC / ASR / "
                                   "time of each plus the backdoor removal rate "
                                   "(OUT/summary.json, summary.png). --dataset cifar10 "
                                   "--data-root DIR (or --download): the shipped CIFAR-10 "
                                   "teacher, distilled as the benchmark does; --dataset digits: "
                                   "train a clean teacher, implant a CKD backdoor, distil it.")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--dataset", choices=DEMO_DATASETS, default=None,
                   help=f"{', '.join(DEMO_DATASETS)} (default {DemoSettings.dataset}; cifar10 "
                        "needs --data-root or --download)")
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 archive")
    p.add_argument("--download", action="store_true",
                   help="cifar10: fetch the official archive into --data-root (default data/) "
                        "and check its md5, unless the dataset is already there")
    p.add_argument("--teacher-model", default=None, help="default wrn16_2")
    p.add_argument("--student-model", default=None, help="default wrn10_1")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--attack-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--robustkd-preset", "--robustkd-config", dest="robustkd_config", default=None,
                   help="named RobustKD configuration (default: the default preset; paper = "
                        "the literal reading)")
    p.add_argument("--detox-epochs", type=int, default=None, help="default 10")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in OUT")
    p.add_argument("--overwrite", action="store_true", help="run every stage again over an "
                                                            "earlier demo in OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_reproduce(sub)
    return parser


def _add_reproduce(sub) -> None:
    """``reproduce`` (run a table/figure of the paper) and ``report`` (re-render it)."""
    from robustkd.experiments.scales import SCALES
    from robustkd.experiments.specs import RECIPES, STUDIES

    p = sub.add_parser(
        "reproduce", help="run the paper's tables/figures at a scale and write a report",
        description="Plans every run the named tables/figures need at the chosen scale "
                    "(shared teachers computed once), runs what OUT does not hold yet "
                    "(an interrupted run resumes), and writes OUT/report.md + PNGs. "
                    f"Targets: {', '.join(sorted(STUDIES))}, all. Scales: "
                    + "; ".join(f"{s.name}: {s.description}" for s in SCALES.values()))
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.add_argument("--scale", default="mini", choices=sorted(SCALES))
    p.add_argument("--out", default="runs/reproduce", metavar="DIR")
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="dataset(s) to run (repeatable; default: the scale's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--attacks", type=_csv, default=None, metavar="A,B",
                   help="only these attacks of each study")
    p.add_argument("--methods", type=_csv, default=None, metavar="M,N",
                   help=f"only these student methods (extra ones add columns): "
                        f"{', '.join(sorted(RECIPES))}")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the final runs (plus what they need)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, each marked done (finished in OUT) or to run; run "
                        "nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("report", help="re-render OUT/report.md from OUT/records.jsonl")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR")
    p.add_argument("targets", nargs="*", metavar="TARGET")


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _run_job(args: argparse.Namespace, run, extra: dict | None = None) -> dict | int:
    """Build the job (defaults, --config, flags), print it for --print-config, else run."""
    job = job_from_args(args, extra)
    if args.print_config:
        print(to_yaml(job), end="")
        return 0
    return run(**job.flat())


def _chosen(args: argparse.Namespace, key: str) -> Any:
    """A choice that decides which other flags apply: the flag, else the config file's
    value, else the job's default."""
    if getattr(args, key, None) is not None:
        return getattr(args, key)
    from robustkd.jobs import JOBS, read_config

    job = JOBS[args._job]
    if args.config:
        return job.from_dict(read_config(args.config)).flat()[key]
    return job().flat()[key]


def _cmd_train(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    return _run_job(args, api.train)


def _cmd_attack(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    attack = _chosen(args, "attack")
    options = {**legacy.legacy_options(args, "attack", attack),
               **entry_options(args, args._attack_flags, attack, choose="--attack")}
    if options:  # checked here, before any data or model is loaded
        from robustkd.attacks import get_attack

        get_attack(attack).make_settings(options)
    return _run_job(args, api.attack, {"options": options or None})


def _pair_student(name: str, teacher: str | None) -> str:
    """The student of pair ``name``, after checking the teacher run is the pair's teacher."""
    from robustkd.models.pairs import check_teacher_run, get_pair

    pair = get_pair(name)
    if teacher is None:
        raise ConfigError(f"--pair checks the teacher's architecture and needs --teacher RUN_DIR; "
                          f"with --teacher-factory give --student {pair.student} instead")
    check_teacher_run(pair, teacher)
    return pair.student


def _cmd_distill(args: argparse.Namespace) -> dict:
    from robustkd import api
    from robustkd.defenses import find_transform
    from robustkd.defenses.registry import get_teacher_defense, make_settings
    from robustkd.distill import get_method
    from robustkd.settings import make_settings as settings_from

    method, defense = _chosen(args, "method"), _chosen(args, "defense")
    # a method that is a teacher transform (robustkd) distils with its own method (FKD)
    transform = find_transform("method", method)
    robustkd = transform is not None
    distils_with = transform.distils_with if robustkd else method
    options = {**legacy.legacy_options(args, "method", distils_with),
               **entry_options(args, args._method_flags, distils_with, choose="--method")}
    rk = {**legacy.legacy_options(args, "robustkd", method if robustkd else None),
          **entry_options(args, args._robustkd_flags, method, choose="--method")}
    for flag in ("robustkd_preset", "detox_from"):
        if getattr(args, flag) is not None and not robustkd:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --method robustkd")
    if args.robustkd_preset:
        rk["preset"] = args.robustkd_preset
    defense_options = {**legacy.legacy_options(args, "defense", defense),
                       **entry_options(args, args._defense_flags, defense,
                                       choose="--defense")}
    # every setting is checked here, where it entered, before any data or model is loaded
    settings_from(get_method(distils_with).settings, options, f"--method {distils_with}",
                  flags=distils_with)
    if robustkd:
        transform.check(rk)
    if defense:
        make_settings(get_teacher_defense(defense), defense_options)
    extra: dict = {"options": options or None, "robustkd": rk if robustkd else None,
                   "defense_options": defense_options or None}
    if args.student_factory and args.student is None:
        extra["student"] = None  # a factory replaces the default architecture
    if args.pair:
        if args.student or args.student_factory:
            raise ConfigError("--pair sets the student: give --pair, or --student / "
                              "--student-factory, not both")
        extra["student"] = _pair_student(args.pair, args.teacher)
    return _run_job(args, api.distill, extra)


def _cmd_defend(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    defense = _chosen(args, "defense")
    options = entry_options(args, args._defense_flags, defense, choose="--defense")
    # the API checks the defence's settings first, before anything loads
    return _run_job(args, api.defend, {"options": options or None})


def _cmd_evaluate(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    return _run_job(args, api.evaluate)


def _cmd_import(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    return _run_job(args, api.import_weights)


def _cmd_scan(args: argparse.Namespace) -> dict | int:
    from robustkd import api

    return _run_job(args, api.scan)


def _cmd_models(args: argparse.Namespace) -> None:
    from robustkd.models import build_model, count_parameters, list_models

    rows = []
    for name in list_models():
        n = count_parameters(build_model(name, num_classes=args.num_classes))
        rows.append({"name": name, "parameters": n})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<16}{'parameters (' + str(args.num_classes) + ' classes)':>28}")
    for row in rows:
        print(f"{row['name']:<16}{row['parameters']:>18,} ({row['parameters'] / 1e6:.2f}M)")


def _cmd_datasets(args: argparse.Namespace) -> int:
    from robustkd.data import list_datasets
    from robustkd.data.registry import verify_data_root

    if args.action == "list":
        for info in list_datasets():
            print("  ".join(f"{k}={v}" for k, v in info.items()))
        return 0
    if not args.data_root:
        print("datasets verify needs --data-root DIR", file=sys.stderr)
        return 2
    results = verify_data_root(args.data_root)
    if not results:
        print(f"{args.data_root}: no SHA256SUMS file to verify against", file=sys.stderr)
        return 1
    bad = 0
    for name, ok, detail in results:
        bad += not ok
        print(f"{'OK ' if ok else 'BAD'} {name}  {detail}")
    return 1 if bad else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from robustkd.demo import DemoSettings, format_summary, run_demo

    chosen = {f.name: getattr(args, f.name) for f in fields(DemoSettings)
              if getattr(args, f.name, None) is not None}
    summary = run_demo(args.out, DemoSettings(**chosen), device=args.device,
                       progress=args.progress, resume=args.resume, overwrite=args.overwrite,
                       data_root=args.data_root, download=args.download)
    print()
    print(format_summary(summary))
    print(f"summary: {args.out}/summary.json" + (f", figure: {summary['figure']}"
                                                 if summary.get("figure") else ""))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from robustkd.experiments import reproduce

    result = reproduce(args.targets, scale=args.scale, out=args.out, data_root=args.data_root,
                       datasets=args.dataset, seeds=args.seeds, attacks=args.attacks,
                       methods=args.methods, shard=args.shard, device=args.device,
                       progress=args.progress, dry_run=args.dry_run)
    print(json.dumps(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robustkd.experiments import report
    from robustkd.experiments.runner import RECORDS_FILE

    if not (Path(args.out) / RECORDS_FILE).exists():
        raise ConfigError(f"{args.out} holds no {RECORDS_FILE}: give the --out of a "
                          "`robustkd reproduce` run")
    print(report(args.out, args.targets or None))
    return 0


COMMANDS = {"train": _cmd_train, "attack": _cmd_attack, "evaluate": _cmd_evaluate,
            "defend": _cmd_defend,
            "import": _cmd_import, "distill": _cmd_distill, "scan": _cmd_scan,
            "models": _cmd_models, "datasets": _cmd_datasets, "demo": _cmd_demo,
            "reproduce": _cmd_reproduce, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    from robustkd import distributed
    from robustkd.utils import git_revision

    git_revision()  # pin the revision of the code this process runs (records cite it)
    args = build_parser().parse_args(argv)
    distributed.init_from_env()  # under torchrun: join the process group (no-op otherwise)
    try:
        result = COMMANDS[args.command](args)
    except (RobustKDError, OSError, UnsafeCheckpointError) as exc:
        if args.debug:
            raise
        text = str(exc) if not isinstance(exc, OSError) or not exc.strerror else \
            f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        print(f"robustkd {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustkd {args.command}: interrupted (use --resume to continue)", file=sys.stderr)
        return 130
    if isinstance(result, dict) and "metrics" in result and distributed.is_main():
        print(json.dumps({"metrics": result["metrics"], "seconds": round(result["seconds"], 1)}))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
