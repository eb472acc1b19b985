"""The main job: the whole RobustKD story in one command, with a table and a picture.

``fractals`` (the default, generated, no files: minutes on a CPU): the teacher is the
backdoored one shipped with the package (:mod:`robustkd.shipped`, as a user would download
one), trained on the generated ``fractals`` data with a Blended backdoor of stripes; it is
distilled into the same small student twice, on 30% of the clean training images, with FKD
and with the default RobustKD. ``cifar10`` (needs the CIFAR-10 archive: ``--data-root``, or
``--download`` on a machine with internet, which fetches the official archive and checks its
md5): the same with the shipped CIFAR-10 teacher, the students being the defence
benchmark's (``Scale.benchmark`` at ``mini``). ``digits`` (embedded): a clean teacher is
trained and a CKD backdoor implanted by poison fine-tuning; on this data the backdoor does
not reach the FKD student (docs/RESULTS.md). Every stage is a run directory with its
``record.json``; ``OUT/summary.json`` holds the table, the triggered examples' predictions
and the verdict, and ``OUT/summary.png`` draws both.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustkd import api
from robustkd.api.context import job_config
from robustkd.api.data import run_data
from robustkd.data import load_dataset
from robustkd.defenses.robustkd import DEFAULT_PRESET
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import predict, triggered_test_set
from robustkd.experiments.scales import get_scale
from robustkd.io import RECORD_FILE, read_json, write_json
from robustkd.outputs import JOB_FILE, changed_settings
from robustkd.plotting import pyplot, save_png
from robustkd.runs import load_run
from robustkd.shipped import materialise, shipped_teacher

SUMMARY_FILE = "summary.json"
FIGURE_FILE = "summary.png"


DATASETS = ("fractals", "digits", "cifar10")
# the demos that distil a shipped teacher (robustkd.shipped): dataset -> teacher
SHIPPED_DEMOS = {"fractals": "blended-stripes-fractals", "cifar10": "blended-stripes-cifar10"}
# the cifar10 demo's students follow the benchmark at this scale
CIFAR_SCALE = "mini"
# the fractals demo's students: 30% of the clean training images (3,000), a short schedule
FRACTALS_STUDENTS = {"student": "wrn16_1", "epochs": 8, "lr": 0.05, "schedule": "step",
                     "batch_size": 64, "clean_fraction": 0.3, "clean_seed": 0}
DOWNLOAD_ROOT = "data"  # where --download puts the CIFAR-10 archive without --data-root
EXAMPLES = 8  # triggered test images drawn with the three models' predictions


@dataclass
class DemoSettings:
    """The demo's data and, for ``digits``, its sizes; the shipped-teacher demos
    (``fractals``, ``cifar10``) take their students' sizes from ``FRACTALS_STUDENTS`` and
    the benchmark."""

    dataset: str = "fractals"
    teacher_model: str = "wrn16_2"
    student_model: str = "wrn10_1"
    teacher_epochs: int = 15
    attack_epochs: int = 5
    student_epochs: int = 15
    batch_size: int = 64
    poison_ratio: float = 0.1
    robustkd_config: str = DEFAULT_PRESET
    detox_epochs: int = 10
    prune_iterations: int | None = None  # None: the preset's (an ANP pruning's batches)
    prune_epochs: int | None = None  # None: the preset's (an FST tuning's epochs)
    seed: int = 0


# DemoSettings fields only the digits demo reads (the others distil a shipped teacher)
DIGITS_ONLY = ("teacher_model", "student_model", "teacher_epochs", "attack_epochs",
               "student_epochs", "batch_size", "poison_ratio", "detox_epochs")

SHIPPED_STAGES = ("shipped-teacher", "fkd-student", "robustkd-student")
STAGES = {"digits": ("teacher", "ckd-teacher", "fkd-student", "robustkd-student"),
          **{name: SHIPPED_STAGES for name in SHIPPED_DEMOS}}


def _stage(out: Path, name: str, fn, resume: bool, overwrite: bool,
           **kwargs) -> dict[str, Any]:
    """Run one stage, or reuse its finished record when ``resume`` is set (``overwrite``
    runs it again over an earlier demo's)."""
    run_dir = out / name
    if resume and not overwrite and (run_dir / RECORD_FILE).exists():
        # reused only if it ran what this demo asks for (its settings, this code's constants)
        job = job_config(fn.job_type.from_flat({**kwargs, "out": run_dir}))
        diff = changed_settings(run_dir / JOB_FILE, job)
        if diff:
            raise ConfigError(f"--resume reuses the finished stage {run_dir} only as it ran; "
                              f"these settings differ: {diff} (--overwrite runs the demo "
                              "again)")
        return read_json(run_dir / RECORD_FILE)
    return fn(out=run_dir, resume=resume and not overwrite, overwrite=overwrite, **kwargs)


def removal_rate(fkd_asr: float, robustkd_asr: float) -> float | None:
    """``1 - ASR(RobustKD) / ASR(FKD)`` (METHOD.md 2); undefined when FKD's ASR is 0."""
    return None if fkd_asr <= 0 else 1.0 - robustkd_asr / fkd_asr


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings | None = None, *,
             device: str = "auto", progress: bool = True, resume: bool = False,
             overwrite: bool = False, data_root: str | None = None,
             download: bool = False) -> dict[str, Any]:
    """Run every stage and write ``summary.json`` (+ PNG); returns the summary. An earlier
    demo in ``out`` is reused with ``resume`` and replaced with ``overwrite``; ``download``
    fetches CIFAR-10 into ``data_root`` (default ``data``) when it is not there."""
    s = settings or DemoSettings()
    if s.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {s.dataset!r}")
    if download and s.dataset != "cifar10":
        raise ConfigError(f"--download fetches CIFAR-10 for --dataset cifar10; the {s.dataset} "
                          "demo needs no files")
    if s.dataset == "cifar10" and data_root is None and not download:
        raise ConfigError("--dataset cifar10 needs --data-root, the folder holding the CIFAR-10 "
                          "archive (`robustkd datasets verify --data-root DIR` checks it), or "
                          "--download to fetch it")
    if s.dataset in SHIPPED_DEMOS:
        default = DemoSettings()
        ignored = [f for f in DIGITS_ONLY if getattr(s, f) != getattr(default, f)]
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            raise ConfigError(f"{flag} sizes the digits demo; --dataset {s.dataset} distils "
                              f"the shipped teacher with fixed student settings")
    if download:
        data_root = fetch_cifar10(data_root)
    out = Path(out)
    stages = STAGES[s.dataset]
    if not (resume or overwrite) and any((out / n / RECORD_FILE).exists() for n in stages):
        raise ConfigError(f"{out} holds an earlier demo: --resume reuses its finished stages, "
                          "--overwrite runs them again, or choose another --out")
    started = time.perf_counter()
    common = {"seed": s.seed, "device": device, "progress": progress}
    stage = {"resume": resume, "overwrite": overwrite}
    run = _digits_stages if s.dataset == "digits" else _shipped_stages
    rows, records, used = run(out, s, common, stage, data_root)
    fkd, rkd = records["fkd-student"], records["robustkd-student"]
    rate = removal_rate(fkd["metrics"]["asr"], rkd["metrics"]["asr"])
    crossed, words = verdict(rows, rate)
    summary = {
        "dataset": s.dataset,
        "rows": rows,
        "removal_rate": rate,
        "backdoor_reached_fkd_student": crossed,
        "verdict": words,
        "settings": used,
        "device": rkd["device"],
        "wall_seconds": time.perf_counter() - started,
        "records": {r: str(out / r / RECORD_FILE) for r in stages},
    }
    examples = None
    try:
        examples = triggered_examples(out, stages, data_root, device)
        summary["examples"] = {k: v for k, v in examples.items() if k != "images"}
    except (OSError, KeyError) as exc:  # a stage without weights (a reused record only)
        summary["examples"] = {"skipped": str(exc)}
    write_json(out / SUMMARY_FILE, summary)
    try:
        plot_summary(summary, out / FIGURE_FILE, examples)
        summary["figure"] = str(out / FIGURE_FILE)
    except ImportError:
        summary["figure"] = None  # matplotlib is an optional extra
    write_json(out / SUMMARY_FILE, summary)
    return summary


def fetch_cifar10(data_root: str | None) -> str:
    """The folder that holds CIFAR-10 after downloading the official archive there (md5
    checked) unless it already holds the dataset in any layout the reader knows."""
    root = Path(data_root if data_root is not None else DOWNLOAD_ROOT).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    load_dataset("cifar10", root, download=True)  # reads it once, so the stages hit the cache
    return str(root)


def _digits_stages(out: Path, s: DemoSettings, common: dict, stage: dict,
                   _data_root: str | None) -> tuple[list[dict], dict[str, dict], dict]:
    """Clean teacher, CKD teacher, FKD and RobustKD students on the embedded digits; the
    stages' records and the settings they used."""
    common = {**common, "batch_size": s.batch_size}
    teacher = _stage(out, "teacher", api.train, **stage, dataset="digits",
                     model=s.teacher_model, epochs=s.teacher_epochs, lr=0.05,
                     schedule="cosine", eval_every=s.teacher_epochs, **common)
    ckd = _stage(out, "ckd-teacher", api.attack, **stage, attack="ckd",
                 teacher=str(out / "teacher"), epochs=s.attack_epochs, lr=0.01,
                 poison_ratio=s.poison_ratio, eval_every=s.attack_epochs,
                 options={"toxic_fraction": 0.1, "trigger_epochs": 5}, **common)
    student = {"teacher": str(out / "ckd-teacher"), "student": s.student_model,
               "epochs": s.student_epochs, "lr": 0.05, "eval_every": s.student_epochs,
               **common}
    fkd = _stage(out, "fkd-student", api.distill, **stage, method="fkd", **student)
    rkd = _stage(out, "robustkd-student", api.distill, **stage, method="robustkd",
                 robustkd={**_robustkd_options(s), "detox_epochs": s.detox_epochs}, **student)
    rows = [
        # the clean teacher's ASR is measured with the CKD trigger: the chance baseline
        {"model": "clean teacher", "acc": ckd["teacher_metrics"]["acc"],
         "asr": ckd["teacher_metrics"]["asr"], "seconds": teacher["seconds"]},
        {"model": "CKD teacher", "acc": ckd["metrics"]["acc"], "asr": ckd["metrics"]["asr"],
         "seconds": ckd["seconds"]},
        _student_row("FKD student", fkd), _student_row("RobustKD student", rkd),
    ]
    return rows, {"fkd-student": fkd, "robustkd-student": rkd}, asdict(s)


def _students(dataset: str) -> dict[str, Any]:
    """The shipped-teacher demo's student settings for ``dataset``."""
    if dataset == "fractals":
        return dict(FRACTALS_STUDENTS)
    b = get_scale(CIFAR_SCALE).benchmark
    return {"student": b.student_model, "epochs": b.student_epochs, "lr": b.student_lr,
            "schedule": b.student_schedule, "batch_size": b.batch_size,
            "clean_fraction": b.clean_fraction, "clean_seed": b.clean_seed}


def _shipped_stages(out: Path, s: DemoSettings, common: dict, stage: dict,
                    data_root: str | None) -> tuple[list[dict], dict[str, dict], dict]:
    """The shipped teacher, then an FKD and a RobustKD student of it; the stages' records
    and the settings they used."""
    name = SHIPPED_DEMOS[s.dataset]
    teacher = materialise(name, out / "shipped-teacher")
    settings = _students(s.dataset)
    student = {"teacher": str(teacher), **settings, "eval_every": settings["epochs"],
               "data_root": data_root, **common}
    fkd = _stage(out, "fkd-student", api.distill, **stage, method="fkd", **student)
    rkd = _stage(out, "robustkd-student", api.distill, **stage, method="robustkd",
                 robustkd=_robustkd_options(s), **student)
    shipped = fkd["teacher_metrics"]  # measured on the demo's test set
    rows = [{"model": f"{shipped_teacher(name).label} (shipped)",
             "acc": shipped["acc"], "asr": shipped["asr"], "seconds": None},
            _student_row("FKD student", fkd), _student_row("RobustKD student", rkd)]
    used = {"dataset": s.dataset, "teacher": name, "seed": s.seed,
            "robustkd": _robustkd_options(s),
            **{k: v for k, v in student.items()
               if k not in ("teacher", "data_root", "device", "progress", "seed")}}
    return rows, {"fkd-student": fkd, "robustkd-student": rkd}, used


def _robustkd_options(s: DemoSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"preset": s.robustkd_config}
    for key in ("prune_iterations", "prune_epochs"):
        if getattr(s, key) is not None:
            options[key] = getattr(s, key)
    return options


def _student_row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    row = {"model": name, "acc": record["metrics"]["acc"], "asr": record["metrics"]["asr"],
           "seconds": record["seconds"]}
    for key in ("prune_seconds", "distill_seconds"):
        if key in record:
            row[key] = record[key]
    return row


@torch.no_grad()
def triggered_examples(out: Path, stages: tuple[str, ...], data_root: str | None,
                       device: str = "auto", n: int = EXAMPLES) -> dict[str, Any]:
    """``n`` triggered non-target test images, evenly spaced through the test set (an
    ImageFolder's class order would otherwise give ``n`` of one class), with the backdoored
    teacher's and both students' predictions (``images``: the uint8 triggered images)."""
    from robustkd.utils import resolve_device

    dev = resolve_device(device)
    teacher = load_run(out / stages[-3], dev)
    splits, _ = run_data(teacher.meta, data_root)
    triggered = triggered_test_set(splits.test, teacher.trigger, teacher.target)
    picks = torch.linspace(0, len(triggered) - 1, min(n, len(triggered))).round().long()
    shown = triggered.subset(picks.unique())
    preds = {name: predict(load_run(out / name, dev).model.to(dev), shown, splits.mean,
                           splits.std, device=dev).tolist() for name in stages[-3:]}
    return {"classes": list(splits.test.classes), "target": teacher.target,
            "labels": shown.labels.tolist(), "predictions": preds, "images": shown.images}


def verdict(rows: list[dict[str, Any]], rate: float | None) -> tuple[bool, str]:
    """Did the backdoor reach the FKD student, and did RobustKD remove it? In words."""
    by = {r["model"]: r for r in rows}
    base = by["clean teacher"]["asr"] if "clean teacher" in by else 0.0
    fkd, rkd = by["FKD student"], by["RobustKD student"]
    level = max(0.10, 2 * base)  # "clearly above what a backdoor-free model shows"
    if fkd["asr"] <= level:
        return False, (f"the backdoor did not reach the FKD student (ASR {fkd['asr']:.1%}"
                       + (f"; clean teacher {base:.1%}" if "clean teacher" in by else "")
                       + "): nothing for RobustKD to remove on this data (`robustkd demo "
                       "--dataset cifar10 --download` shows a backdoor that crosses and its "
                       "removal; docs/RESULTS.md)")
    if rkd["asr"] <= level:
        return True, (f"plain distillation (FKD) hands the teacher's backdoor to the student "
                      f"(ASR {fkd['asr']:.1%}); RobustKD's student does not take it "
                      f"({rkd['asr']:.1%}, removal rate {rate:.0%}) at ACC {rkd['acc']:.1%} vs "
                      f"{fkd['acc']:.1%}: distil an untrusted teacher with RobustKD")
    return True, (f"backdoor removal rate {rate:.0%}: ASR {fkd['asr']:.1%} (FKD) -> "
                  f"{rkd['asr']:.1%} (RobustKD), ACC {fkd['acc']:.1%} -> {rkd['acc']:.1%}; "
                  "the backdoor was NOT removed")


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's table and a one-line verdict, as printed by ``robustkd demo``."""
    w = max(24, *(len(r["model"]) + 2 for r in summary["rows"]))
    lines = [f"{'model':<{w}}{'ACC':>9}{'ASR':>9}{'time':>9}"]
    for r in summary["rows"]:
        took = "shipped" if r["seconds"] is None else f"{r['seconds']:.0f}s"
        lines.append(f"{r['model']:<{w}}{r['acc']:>9.2%}{r['asr']:>9.2%}{took:>9}")
    lines.append("ASR: share of triggered non-target test images classified as the target class")
    lines.append(verdict(summary["rows"], summary["removal_rate"])[1])
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: str | Path,
                 examples: dict[str, Any] | None = None) -> None:
    """Bars of ACC and ASR per row and, with ``examples``, the triggered test images with
    what each model predicts for them (raises ImportError without matplotlib)."""
    plt = pyplot()
    if plt is None:
        raise ImportError("matplotlib is not installed (pip install robustkd[plot])")
    n = 0 if examples is None else len(examples["labels"])
    fig = plt.figure(figsize=(max(7.0, 1.1 * n), 3.6 + (2.3 if n else 0.0)))
    grid = fig.add_gridspec(2 if n else 1, max(n, 1), height_ratios=[3.6, 2.3] if n else [1])
    _draw_bars(fig.add_subplot(grid[0, :]), summary)
    for i in range(n):
        _draw_example(fig.add_subplot(grid[1, i]), examples, i)
    fig.tight_layout()
    save_png(fig, path)


def _draw_bars(ax, summary: dict[str, Any]) -> None:
    rows = summary["rows"]
    xs = range(len(rows))
    width = 0.38
    acc = [100 * r["acc"] for r in rows]
    asr = [100 * r["asr"] for r in rows]
    ax.bar([x - width / 2 for x in xs], acc, width, label="ACC %", color="#4477aa")
    ax.bar([x + width / 2 for x in xs], asr, width, label="ASR %", color="#cc6677")
    for x, a, b in zip(xs, acc, asr, strict=True):
        ax.text(x - width / 2, a + 1, f"{a:.1f}", ha="center", fontsize=8)
        ax.text(x + width / 2, b + 1, f"{b:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [r["model"] for r in rows])
    ax.set_ylim(0, 110)
    rate = summary["removal_rate"]
    title = f"robustkd demo ({summary['dataset']}): the backdoor through FKD vs RobustKD"
    if not summary.get("backdoor_reached_fkd_student", True):
        title += "\nthe backdoor did not reach the FKD student: nothing to remove here"
    elif rate is not None:
        title += f"\nbackdoor removal rate {rate:.0%}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)


def _draw_example(ax, examples: dict[str, Any], i: int) -> None:
    """One triggered image; under it the true label and each model's prediction, red where
    the model says the backdoor's target."""
    image = examples["images"][i]
    ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(),
              cmap="gray" if image.shape[0] == 1 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    classes, target = examples["classes"], examples["target"]
    short = {"shipped-teacher": "teacher", "ckd-teacher": "teacher", "fkd-student": "FKD",
             "robustkd-student": "RobustKD"}
    ax.set_title(f"true: {classes[examples['labels'][i]]}", fontsize=7)
    for k, (stage, preds) in enumerate(examples["predictions"].items()):
        pred = preds[i]
        ax.text(0.5, -0.12 - 0.16 * k, f"{short.get(stage, stage)}: {classes[pred]}",
                transform=ax.transAxes, ha="center", va="top", fontsize=7,
                color="#cc3311" if pred == target else "black")
