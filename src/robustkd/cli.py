"""The ``robustkd`` command. Thin: parse arguments, call :mod:`robustkd.api`, print results."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from robustkd import __version__
from robustkd.errors import ConfigError, RobustKDError, UnsafeCheckpointError


def _add_data_args(p: argparse.ArgumentParser, dataset_default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=dataset_default,
                   help="digits (embedded), cifar10, cifar100, gtsrb, flower17, "
                        "tinyimagenet200, or any NAME with an ImageFolder layout in --data-root")
    g.add_argument("--data-root", default=None,
                   help="folder holding NAME.tar.gz, NAME/{train,test}/<class>/… or the official "
                        "CIFAR archives (e.g. ../shared/data)")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize images to this square size when decoding")
    g.add_argument("--train-fraction", type=float, default=None,
                   help="deterministic per-class fraction of the training set to use")
    g.add_argument("--download", action="store_true",
                   help="download the official CIFAR archive into --data-root if missing "
                        "(checksum verified)")
    g.add_argument("--holdout", type=float, default=None,
                   help="evaluate on this per-class fraction of the training set, held out "
                        "(a validation split for choosing settings; later attack/distill runs "
                        "from this run inherit it)")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    """``--stream``/``--workers`` (train and distill): data decoded from disk per batch."""
    g = p.add_argument_group("streaming (data too big for memory, e.g. ImageNet-1k)")
    g.add_argument("--stream", action="store_true",
                   help="decode DATA_ROOT/NAME/{train,val}/<class>/<image> (or NAME.tar.gz, "
                        "extracted once into the cache) from disk batch by batch instead of "
                        "loading it into memory; --image-size is then the crop size (default "
                        "224). Always on for imagenet and for students of a streamed teacher; "
                        "train and distill --method fkd|kd|ce only (see docs/streaming.md)")
    g.add_argument("--workers", type=int, default=None,
                   help="decoding processes for --stream (default: CPU count, at most 8)")


def _add_run_args(p: argparse.ArgumentParser, *, epochs: int | None, lr: float | None,
                  schedule: str | None) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    g.add_argument("--schedule", default=schedule, choices=["step", "cosine", "constant"],
                   help="step divides the lr by 10 at 50%% and 75%% of the epochs")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: end)")
    _add_common(p)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its last finished epoch")
    g.add_argument("--no-amp", dest="amp", action="store_false",
                   help="disable bf16 autocast (on CUDA, and on CPUs with native bf16)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   default=None, help="keep NCHW memory format (default: channels_last)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from robustkd.attacks import ATTACKS

    parser = argparse.ArgumentParser(
        prog="robustkd",
        description="Robust knowledge distillation: distil a possibly backdoored teacher "
                    "into a small student that keeps its accuracy but not its backdoor.")
    parser.add_argument("--version", action="version", version=f"robustkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a clean classifier (teacher or baseline)",
                       description="Train a clean classifier from scratch and write RUN_DIR.")
    _add_data_args(p)
    _add_stream_args(p)
    p.add_argument("--model", default="wrn16_2", help="architecture (see `robustkd models`)")
    _add_run_args(p, epochs=30, lr=0.1, schedule="step")
    p.add_argument("--out", required=True, metavar="RUN_DIR")

    p = sub.add_parser("attack", help="implant a backdoor into a teacher",
                       description="Poison-fine-tune a clean teacher (--teacher RUN_DIR) or "
                                   "train a poisoned model from scratch (--model NAME).")
    p.add_argument("--attack", required=True, choices=sorted(ATTACKS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="RUN_DIR", help="clean teacher run to fine-tune")
    src.add_argument("--model", help="architecture to poison from scratch")
    p.add_argument("--trigger-teacher", metavar="RUN_DIR", default=None,
                   help="with --model: clean run a learned trigger (ckd, lba) is optimised on; "
                        "its ASR under the trigger is recorded as the backdoor-free level")
    _add_data_args(p, dataset_default=None)
    g = p.add_argument_group("poisoning")
    g.add_argument("--target", type=int, default=0, help="target class index")
    g.add_argument("--poison-ratio", type=float, default=0.02,
                   help="fraction of each non-target class that is triggered and relabelled")
    g.add_argument("--no-keep-originals", dest="keep_originals", action="store_false",
                   help="replace the poisoned images' clean originals instead of keeping them")
    g.add_argument("--trigger-seed", type=int, default=0)
    before = {a.dest for a in p._actions}
    shared = []
    for spec in ATTACKS.values():
        spec.add_arguments(p)
        shared += [f for f in spec.shared_arguments if f not in shared]
    for add in shared:
        add(p)
    p.set_defaults(_attack_options=sorted({a.dest for a in p._actions} - before)
                   + ["trigger_seed"])
    _add_run_args(p, epochs=None, lr=None, schedule=None)
    p.add_argument("--out", required=True, metavar="RUN_DIR")

    p = sub.add_parser("distill", help="distil a teacher into a student on clean data",
                       description="Train a student from a (possibly backdoored) teacher on the "
                                   "clean training data or the defender's clean subset; reports "
                                   "ACC, and ASR under the teacher's trigger when it is known.")
    from robustkd.distill import METHODS

    p.add_argument("--method", default="fkd", choices=sorted([*METHODS, "robustkd"]),
                   help="robustkd = detoxification masks + FKD from the detoxified teacher")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="RUN_DIR", help="teacher run directory")
    src.add_argument("--teacher-factory", metavar="MODULE:FUNC",
                     help="build your own teacher nn.Module (takes num_classes/in_channels "
                          "if it accepts them)")
    p.add_argument("--teacher-weights", metavar="FILE", help="weights for --teacher-factory")
    p.add_argument("--teacher-layers", type=_names, default=None, metavar="A,B,C",
                   help="teacher modules to distil (default: the model's declared layers)")
    stu = p.add_mutually_exclusive_group()
    stu.add_argument("--student", default=None, help="student architecture (default wrn16_1)")
    stu.add_argument("--student-factory", metavar="MODULE:FUNC")
    stu.add_argument("--pair", default=None, metavar="TEACHER-STUDENT",
                     help="a teacher->student pair of the paper's Table 2 (sets --student and "
                          "checks the --teacher run's architecture): wrn28_4-wrn16_4, "
                          "wrn28_4-wrn28_2, wrn28_4-wrn16_2, wrn28_4-resnet56, "
                          "pyramidnet200-wrn28_4, pyramidnet200-pyramidnet110")
    p.add_argument("--student-layers", type=_names, default=None, metavar="A,B,C")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle teacher weights (loaded with weights_only=True)")
    p.add_argument("--trigger-from", default=None, metavar="RUN_DIR",
                   help="measure the student's ASR with this run's trigger")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="default: the teacher run's dataset")
    g.add_argument("--data-root", default=None)
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--clean-fraction", type=float, default=None,
                   help="per-class fraction of the clean training set the defender holds")
    g.add_argument("--clean-seed", type=int, default=None,
                   help="seed choosing the defender's clean images (default: --seed); fix it "
                        "to compare student seeds on the same data")
    g.add_argument("--holdout", type=float, default=None,
                   help="evaluate on a held-out validation split (default: the teacher run's)")
    _add_stream_args(p)
    g = p.add_argument_group("method options (only those the method takes)")
    g.add_argument("--temperature", type=float, default=None, help="kd: softmax temperature")
    g.add_argument("--kd-alpha", dest="alpha", type=float, default=None,
                   help="kd: weight of the soft-target term")
    g.add_argument("--beta", type=float, default=None, help="fkd: feature-loss weight")
    g.add_argument("--teacher-bn", default=None, choices=["train", "eval"],
                   help="fkd: teacher BN on batch statistics (train, FKD's choice) or running")
    g.add_argument("--spatial", default=None, choices=["error", "pool"],
                   help="fkd: what to do when teacher/student maps differ in size")
    g.add_argument("--input-noise", type=float, default=None,
                   help="fkd: salt-and-pepper noise on this fraction of the student's input "
                        "pixels (the RobustKD authors' undocumented trick; default 0)")
    p.set_defaults(_method_options=["temperature", "alpha", "beta", "teacher_bn", "spatial",
                                    "input_noise"])
    g = p.add_argument_group("robustkd (detoxification) options; defaults = the paper's reading")
    g.add_argument("--tau", type=float, default=None, help="mask threshold (default 0.2)")
    g.add_argument("--taus", type=_floats, default=None, metavar="T1,T2,…",
                   help="thresholds to choose from with --selection")
    g.add_argument("--selection", default=None, choices=["blind", "oracle"],
                   help="blind: clean data only (default); oracle: needs the trigger (research)")
    g.add_argument("--epsilon", type=float, default=None,
                   help="accuracy tolerance of the selection rule (default 0.02)")
    g.add_argument("--mask-variant", dest="variant", default=None, choices=["eq7", "eq15"])
    g.add_argument("--layers", default=None, choices=["all", "last", "last2"],
                   help="distillation layers to detoxify (default all)")
    g.add_argument("--detox-loss", dest="loss", default=None, choices=["ce+var", "ce", "var"])
    g.add_argument("--lam", type=float, default=None, help="weight of the variance term (1)")
    g.add_argument("--detox-epochs", type=int, default=None, help="default 40")
    g.add_argument("--detox-lr", type=float, default=None, help="Adam lr (default 1e-3)")
    g.add_argument("--mask-init", type=float, default=None, help="initial mask (default tau/2)")
    g.add_argument("--mask-shape", default=None, choices=["element", "channel"],
                   help="one mask value per feature element (paper) or per channel")
    g.add_argument("--open-weight", type=float, default=None,
                   help="weight of the mask-opening reward (not in the paper; default 0)")
    g.add_argument("--consistency", type=float, default=None,
                   help="share of each batch the student sees with a synthetic trigger "
                        "(trigger-consistent distillation, not in the paper; default 0)")
    g.add_argument("--inversion-epochs", type=int, default=None,
                   help="epochs of blind trigger synthesis (default 5)")
    g.add_argument("--inversion-mask-max", type=float, default=None,
                   help="largest blend weight of a synthetic trigger (default 0.5)")
    g.add_argument("--inversion-classes", default=None, choices=["all", "suspects"],
                   help="synthetic triggers the student sees: every class's (default) or only "
                        "the suspects, whose success stands out (robust z >= --outlier-z)")
    g.add_argument("--outlier-z", type=float, default=None,
                   help="robust z-score that makes a class a suspect (default 2)")
    g.add_argument("--detox-from", default=None, metavar="RUN_DIR",
                   help="reuse the detox masks (and synthetic triggers) of an earlier robustkd "
                        "run with the same teacher instead of training new ones")
    g.add_argument("--robustkd-config", dest="preset", default=None,
                   help="named robustkd configuration (see docs/RESULTS.md): "
                        "improved (default: paper masks + trigger consistency on suspect "
                        "classes), paper (the literal reading) or consistency-all")
    p.set_defaults(_robustkd_options=["tau", "taus", "selection", "epsilon", "variant",
                                      "layers", "loss", "lam", "detox_epochs", "detox_lr",
                                      "mask_init", "mask_shape", "open_weight", "consistency",
                                      "inversion_epochs", "inversion_mask_max", "inversion_classes",
                                      "outlier_z", "preset"])
    from robustkd.defenses import TEACHER_DEFENSES

    g = p.add_argument_group(
        "teacher defence baselines (METHOD.md 5.7): clean a copy of the teacher on the clean "
        "data, then distil from it with --method (default fkd); defaults: NAD paper/code")
    g.add_argument("--defense", default=None, choices=sorted(TEACHER_DEFENSES),
                   help="finetune: SGD fine-tuning of the teacher copy; nad: Neural Attention "
                        "Distillation (Li et al. 2021) with a fine-tuned attention teacher; "
                        "anp: adversarial neuron pruning (Wu & Wang 2021); ibau: implicit "
                        "backdoor adversarial unlearning (Zeng et al. 2022); settings of "
                        "anp/ibau via --defense-set KEY=VALUE")
    g.add_argument("--defense-epochs", type=int, default=None,
                   help="finetune: fine-tuning epochs (10); nad: erasing epochs (10)")
    g.add_argument("--defense-lr", type=float, default=None,
                   help="finetune: SGD lr (0.01, constant); nad: erasing lr (0.01, /10 after "
                        "--nad-lr-drop-epoch; the NAD paper's 0.1 diverged on our WRNs)")
    g.add_argument("--defense-batch-size", type=int, default=None, help="default 64")
    g.add_argument("--defense-weight-decay", type=float, default=None,
                   help="finetune 5e-4, nad 1e-4")
    g.add_argument("--nad-teacher-epochs", type=int, default=None,
                   help="nad: fine-tuning epochs of the attention teacher (10)")
    g.add_argument("--nad-teacher-lr", type=float, default=None,
                   help="nad: lr of the attention teacher (default: --defense-lr)")
    g.add_argument("--nad-lr-drop-epoch", type=int, default=None,
                   help="nad: epoch from which the lr is divided by 10 (2)")
    g.add_argument("--nad-betas", type=_floats, default=None, metavar="B1,B2,…",
                   help="nad: attention-loss weight per distillation layer (500,1000,1000; the "
                        "official code's later default is 0,0,5000)")
    g.add_argument("--nad-power", type=float, default=None,
                   help="nad: p of the attention map mean_c |F_c|^p (2)")
    g.add_argument("--defense-set", action="append", default=None, metavar="KEY=VALUE",
                   help="any setting of the chosen defence by its name (repeatable), e.g. "
                        "--defense anp --defense-set threshold=0.3; unknown keys are an error "
                        "listing the defence's settings")
    p.set_defaults(_defense_options={
        "defense_epochs": "epochs", "defense_lr": "lr", "defense_batch_size": "batch_size",
        "defense_weight_decay": "weight_decay", "nad_teacher_epochs": "teacher_epochs",
        "nad_teacher_lr": "teacher_lr", "nad_lr_drop_epoch": "lr_drop_epoch",
        "nad_betas": "betas", "nad_power": "p"})
    _add_run_args(p, epochs=200, lr=0.1, schedule="step")
    p.add_argument("--out", required=True, metavar="RUN_DIR")

    p = sub.add_parser("evaluate", help="ACC / ASR / feature variance of a run",
                       description="Evaluate a run directory on its dataset's test split.")
    p.add_argument("--model-dir", required=True, metavar="RUN_DIR")
    p.add_argument("--dataset", default=None, help="override the run's dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--trigger-from", default=None, metavar="RUN_DIR",
                   help="measure ASR with the trigger of another run (e.g. a teacher)")
    p.add_argument("--feature-samples", type=int, default=0,
                   help="also report per-example feature variance on N random test images")
    p.add_argument("--batch-size", type=int, default=256)
    _add_common(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where record.json goes (default RUN_DIR/evaluation)")

    p = sub.add_parser("import", help="turn an external weights file into a run directory",
                       description="Load a teacher's weights (e.g. downloaded from a model hub) "
                                   "into a built-in architecture, evaluate it, and write RUN_DIR "
                                   "as safetensors. Pickle files are refused unless "
                                   "--allow-pickle is given.")
    p.add_argument("--model", required=True, help="architecture the weights belong to")
    p.add_argument("--weights", required=True, help=".safetensors (or .pt/.pth with "
                                                    "--allow-pickle)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint, loaded with torch.load(weights_only=True)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    _add_common(p)
    p.add_argument("--out", required=True, metavar="RUN_DIR")

    p = sub.add_parser("scan", help="feature-variance statistics of a model (paper Fig. 2)",
                       description="Per-layer per-example feature variance on clean test "
                                   "images; with --reference, the ratio to another model with "
                                   "a bootstrap interval, and a histogram PNG.")
    p.add_argument("--model-dir", required=True, metavar="RUN_DIR")
    p.add_argument("--reference", default=None, metavar="RUN_DIR",
                   help="e.g. the clean model to compare a suspect one against")
    p.add_argument("--samples", type=int, default=100, help="clean test images (paper: 100)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-root", default=None)
    _add_common(p)
    p.add_argument("--out", default=None, metavar="DIR", help="default RUN_DIR/scan")

    p = sub.add_parser("models", help="list architectures with parameter counts")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("datasets", help="list known datasets or verify a data folder")
    p.add_argument("action", choices=["list", "verify"], nargs="?", default="list")
    p.add_argument("--data-root", default=None)

    p = sub.add_parser("demo", help="the main job on the embedded digits data",
                       description="On the embedded digits data: train a clean teacher, "
                                   "implant a CKD backdoor, distil it into a student with FKD "
                                   "and with RobustKD, and print ACC / ASR / time of each plus "
                                   "the backdoor removal rate (OUT/summary.json, summary.png).")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--teacher-model", default=None, help="default wrn16_2")
    p.add_argument("--student-model", default=None, help="default wrn10_1")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--attack-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--robustkd-config", default=None,
                   help="named RobustKD configuration (default improved; paper = literal)")
    p.add_argument("--detox-epochs", type=int, default=None, help="default 10")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in OUT")
    _add_common(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_reproduce(sub)
    return parser


def _add_reproduce(sub) -> None:
    """``reproduce`` (run a table/figure of the paper) and ``report`` (re-render it)."""
    from robustkd.experiments.scales import SCALES
    from robustkd.experiments.specs import METHODS, STUDIES

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
                        f"{', '.join(sorted(METHODS))}")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the final runs (plus what they need)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("report", help="re-render OUT/report.md from OUT/records.jsonl")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR")
    p.add_argument("targets", nargs="*", metavar="TARGET")


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


_RUN_KEYS = ("dataset", "data_root", "image_size", "train_fraction", "download", "epochs",
             "batch_size", "lr", "optimizer", "schedule", "weight_decay", "momentum", "seed",
             "device", "out", "resume", "amp", "channels_last", "compile", "progress", "eval_every",
             "holdout")


def _cmd_train(args: argparse.Namespace) -> dict:
    from robustkd import api

    return api.train(model=args.model, stream=args.stream, workers=args.workers,
                     **{k: getattr(args, k) for k in _RUN_KEYS})


def _cmd_attack(args: argparse.Namespace) -> dict:
    from robustkd import api

    options = {k: getattr(args, k) for k in args._attack_options}
    return api.attack(attack=args.attack, teacher=args.teacher, model=args.model,
                      target=args.target, poison_ratio=args.poison_ratio,
                      keep_originals=args.keep_originals, options=options,
                      trigger_teacher=args.trigger_teacher,
                      **{k: getattr(args, k) for k in _RUN_KEYS})


def _pair_student(name: str, teacher: str | None) -> str:
    """The student of pair ``name``, after checking the teacher run is the pair's teacher."""
    from robustkd.models.pairs import check_teacher_run, get_pair

    pair = get_pair(name)
    if teacher is None:
        raise ConfigError(f"--pair checks the teacher's architecture and needs --teacher RUN_DIR; "
                          f"with --teacher-factory give --student {pair.student} instead")
    check_teacher_run(pair, teacher)
    return pair.student


def _defense_options(args: argparse.Namespace) -> dict | None:
    """Settings of the chosen teacher defence from the --defense-*/--nad-* flags."""
    given = {dest: getattr(args, dest) for dest in args._defense_options
             if getattr(args, dest) is not None}
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if given and args.defense is None:
        raise ConfigError(f"{flags} need --defense NAME")
    nad_only = [k for k in given if k.startswith("nad_")]
    if nad_only and args.defense != "nad":
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in nad_only)} apply to "
                          "--defense nad")
    options = {args._defense_options[k]: v for k, v in given.items()}
    for item in args.defense_set or ():
        if args.defense is None:
            raise ConfigError("--defense-set needs --defense NAME")
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--defense-set takes KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _setting_value(value.strip())
    if options:  # checked here, where the flags entered, before any data or model is loaded
        from robustkd.defenses.registry import get_teacher_defense, make_settings

        try:
            make_settings(get_teacher_defense(args.defense), options)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"--defense-set / --defense-* for {args.defense}: {exc}") from None
    return options or None


def _setting_value(text: str) -> Any:
    """A --defense-set value as JSON when it parses (numbers, true, null, [lists]), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_distill(args: argparse.Namespace) -> dict:
    from robustkd import api
    from robustkd.distill import get_method

    accepted = set(get_method("fkd" if args.method == "robustkd" else args.method).defaults)
    robustkd = {k: getattr(args, k) for k in args._robustkd_options
                if getattr(args, k) is not None}
    if args.detox_from and args.method != "robustkd":
        raise ConfigError("--detox-from applies to --method robustkd")
    if robustkd and args.method != "robustkd":
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in robustkd)} apply to "
                          "--method robustkd")
    options = {k: getattr(args, k) for k in args._method_options if getattr(args, k) is not None}
    wrong = sorted(set(options) - accepted)
    if wrong:
        raise ConfigError(f"--method {args.method} does not take {', '.join(wrong)}; "
                          f"it takes {sorted(accepted) or 'no options'}")
    defense_options = _defense_options(args)
    student = args.student or (None if args.student_factory else "wrn16_1")
    if args.pair:
        student = _pair_student(args.pair, args.teacher)
    keys = [k for k in _RUN_KEYS if k not in ("train_fraction", "download")]
    return api.distill(method=args.method, teacher=args.teacher,
                       teacher_factory=args.teacher_factory, teacher_weights=args.teacher_weights,
                       teacher_layers=args.teacher_layers, student=student,
                       student_factory=args.student_factory, student_layers=args.student_layers,
                       allow_pickle=args.allow_pickle, trigger_from=args.trigger_from,
                       clean_fraction=args.clean_fraction, options=options,
                       robustkd=robustkd if args.method == "robustkd" else None,
                       defense=args.defense, defense_options=defense_options,
                       detox_from=args.detox_from, stream=args.stream, workers=args.workers,
                       clean_seed=args.clean_seed,
                       **{k: getattr(args, k) for k in keys if k != "compile"})


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    from robustkd import api

    return api.evaluate(model_dir=args.model_dir, dataset=args.dataset, data_root=args.data_root,
                        trigger_from=args.trigger_from, feature_samples=args.feature_samples,
                        batch_size=args.batch_size, seed=args.seed, device=args.device,
                        out=args.out)


def _cmd_import(args: argparse.Namespace) -> dict:
    from robustkd import api

    return api.import_weights(model=args.model, weights=args.weights, dataset=args.dataset,
                              data_root=args.data_root, image_size=args.image_size,
                              allow_pickle=args.allow_pickle, device=args.device,
                              seed=args.seed, out=args.out)


def _cmd_scan(args: argparse.Namespace) -> dict:
    from robustkd import api

    return api.scan(model_dir=args.model_dir, reference=args.reference, samples=args.samples,
                    dataset=args.dataset, data_root=args.data_root, seed=args.seed,
                    device=args.device, out=args.out)


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
                       progress=args.progress, resume=args.resume)
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
    from robustkd.experiments import report

    print(report(args.out, args.targets or None))
    return 0


COMMANDS = {"train": _cmd_train, "attack": _cmd_attack, "evaluate": _cmd_evaluate,
            "import": _cmd_import, "distill": _cmd_distill, "scan": _cmd_scan,
            "models": _cmd_models, "datasets": _cmd_datasets, "demo": _cmd_demo,
            "reproduce": _cmd_reproduce, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    from robustkd.training import distributed
    from robustkd.utils import git_revision

    git_revision()  # pin the revision of the code this process runs (records cite it)
    args = build_parser().parse_args(argv)
    distributed.init_from_env()  # under torchrun: join the process group (no-op otherwise)
    try:
        result = COMMANDS[args.command](args)
    except (RobustKDError, FileNotFoundError, UnsafeCheckpointError) as exc:
        print(f"robustkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustkd {args.command}: interrupted (use --resume to continue)", file=sys.stderr)
        return 130
    if isinstance(result, dict) and "metrics" in result and distributed.is_main():
        print(json.dumps({"metrics": result["metrics"], "seconds": round(result["seconds"], 1)}))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
