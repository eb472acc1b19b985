"""Investigation grid on a validation split: does CKD/LBA cross FKD, and which RobustKD
configuration removes it? (METHOD.md 5.6.)

Every run holds out ``--holdout`` of each training class as the validation split (its
records' metrics are validation ACC/ASR: settings are compared there, never on the test
set). Each finished student is also evaluated once on the real test set for reporting.
Stages run in priority order while the time budget lasts; each result is appended to
``OUT/study.json`` as soon as it exists (atomic writes), so a cut-off run keeps what it
finished. A stage whose record exists is reused (resumable).

    python benchmarks/study.py --data-root ../shared/data --out runs/study --device cuda \
        --budget 420
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any

from robustkd import api
from robustkd.data.registry import load_dataset
from robustkd.evaluation.metrics import evaluate_model
from robustkd.io import RECORD_FILE, read_json, write_json
from robustkd.runs import load_run
from robustkd.utils import resolve_device

CKD = {"toxic_fraction": 0.1, "trigger_epochs": 5, "trigger_images": 2000, "trigger_lr": 0.005}
LBA = {"trigger_epochs": 5, "trigger_images": 2000, "trigger_lr": 0.005}

# RobustKD configurations under investigation (``paper`` = literal reading, METHOD.md 5.1-5.2)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tau1": {"tau": 1.0},
    "tau1-open": {"tau": 1.0, "mask_init": 0.1, "open_weight": 0.5},
    "tau1-channel-open": {"tau": 1.0, "mask_init": 0.1, "mask_shape": "channel",
                          "open_weight": 0.5},
    "tau1-open-fast": {"tau": 1.0, "mask_init": 0.1, "open_weight": 0.5, "detox_lr": 0.01},
    "tau1-open-last": {"tau": 1.0, "mask_init": 0.1, "open_weight": 0.5, "layers": "last"},
    "tau1-open2": {"tau": 1.0, "mask_init": 0.1, "open_weight": 2.0},
    # paper detox + trigger-consistent distillation (defenses/inversion.py)
    "improved": {"preset": "improved"},
    "improved-c1": {"preset": "improved", "consistency": 1.0},
    # the first reading of "improved": every class's trigger at blend budget 0.5
    "consistency-all": {"preset": "consistency-all"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--device", default="auto")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--train-fraction", type=float, default=None)
    p.add_argument("--teacher-model", default="wrn16_2")
    p.add_argument("--student-model", default="wrn16_1")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--attack-epochs", type=int, default=5)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--small-fraction", type=float, default=0.1,
                   help="defender's clean fraction for the small-data FKD row")
    p.add_argument("--detox-epochs", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budget", type=float, default=1e9, help="seconds; stop starting stages")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    dev = resolve_device(args.device)
    test = load_dataset("cifar10", args.data_root)
    common = {"seed": args.seed, "device": args.device, "progress": False}
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}

    def save() -> None:
        write_json(out / "study.json", {"settings": vars(args), "rows": rows,
                                        "wall_seconds": time.perf_counter() - started})

    def stage(name: str, fn, estimate: str | None = None, **kw) -> dict | None:
        run_dir = out / name
        if (run_dir / RECORD_FILE).exists():
            return read_json(run_dir / RECORD_FILE)
        est = seconds.get(estimate or name, 0.0)
        left = args.budget - (time.perf_counter() - started)
        if est > left:
            print(f"[budget] skip {name}: needs ~{est:.0f}s, {left:.0f}s left", flush=True)
            return None
        print(f"[run] {name}", flush=True)
        t = time.perf_counter()
        try:
            rec = fn(out=run_dir, **kw)
        except Exception as exc:  # one failed stage must not lose the others
            traceback.print_exc()
            rows.append({"name": name, "error": repr(exc)})
            save()
            return None
        seconds[estimate or name] = max(seconds.get(estimate or name, 0.0),
                                        time.perf_counter() - t)
        return rec

    def report(name: str, rec: dict | None, **info) -> None:
        if rec is None:
            return
        row = {"name": name, "val": rec["metrics"], "seconds": rec["seconds"], **info}
        for k in ("detox_seconds", "distill_seconds", "chosen_tau"):
            if k in rec:
                row[k] = rec[k]
        if "robustkd" in rec:
            row["detoxified_teacher_val"] = rec["robustkd"]["detoxified_teacher_metrics"]
        run = load_run(out / name, dev)
        trig = run.trigger
        target = run.target
        if trig is None and info.get("teacher"):
            parent = load_run(out / info["teacher"], dev)
            trig, target = parent.trigger, parent.target
        row["test"] = evaluate_model(run.model, test.test, test.mean, test.std, trigger=trig,
                                     target=target, device=dev)
        rows.append(row)
        print(row, flush=True)
        save()

    clean = stage("clean-teacher", api.train, dataset="cifar10", data_root=args.data_root,
                  model=args.teacher_model, epochs=args.teacher_epochs, schedule="cosine",
                  lr=0.1, holdout=args.holdout, train_fraction=args.train_fraction,
                  eval_every=args.teacher_epochs, **common)
    report("clean-teacher", clean)
    if clean is None:
        return
    student = {"student": args.student_model, "epochs": args.student_epochs, "lr": 0.1,
               "schedule": "step", "eval_every": args.student_epochs, **common}
    teachers = {}
    for attack, opts in (("ckd", CKD), ("lba", LBA)):
        rec = stage(f"{attack}-teacher", api.attack, estimate="attack", attack=attack,
                    teacher=str(out / "clean-teacher"), epochs=args.attack_epochs, lr=0.01,
                    poison_ratio=0.1, options=opts, eval_every=args.attack_epochs, **common)
        report(f"{attack}-teacher", rec)
        if rec is not None:
            teachers[attack] = str(out / f"{attack}-teacher")
        if attack == "ckd" and rec is not None:
            # the premise first, then the literal defence and the candidate fixes
            t = teachers["ckd"]
            report("ckd-fkd", stage("ckd-fkd", api.distill, estimate="student", method="fkd",
                                    teacher=t, **student), teacher="ckd-teacher")
            report("ckd-ce", stage("ckd-ce", api.distill, estimate="ce", method="ce",
                                   teacher=t, **student), teacher="ckd-teacher")
            for v in args.variants.split(","):
                cfg = {**VARIANTS[v], "detox_epochs": args.detox_epochs}
                report(f"ckd-rkd-{v}", stage(f"ckd-rkd-{v}", api.distill, estimate="rkd",
                                             method="robustkd", teacher=t, robustkd=cfg,
                                             **student), teacher="ckd-teacher", config=cfg)
    if "lba" in teachers:
        t = teachers["lba"]
        report("lba-fkd", stage("lba-fkd", api.distill, estimate="student", method="fkd",
                                teacher=t, **student), teacher="lba-teacher")
        for v in ("paper", "tau1-open"):
            cfg = {**VARIANTS[v], "detox_epochs": args.detox_epochs}
            report(f"lba-rkd-{v}", stage(f"lba-rkd-{v}", api.distill, estimate="rkd",
                                         method="robustkd", teacher=t, robustkd=cfg, **student),
                   teacher="lba-teacher", config=cfg)
    if "ckd" in teachers:
        t = teachers["ckd"]
        report("ckd-fkd-noise", stage("ckd-fkd-noise", api.distill, estimate="student",
                                      method="fkd", teacher=t, options={"input_noise": 0.1},
                                      **student), teacher="ckd-teacher")
        small = {**student, "epochs": args.student_epochs * 3,
                 "eval_every": args.student_epochs * 3}
        report("ckd-fkd-small", stage("ckd-fkd-small", api.distill, estimate="ce",
                                      method="fkd", teacher=t, clean_fraction=args.small_fraction,
                                      **small), teacher="ckd-teacher")
    save()


if __name__ == "__main__":
    main()
