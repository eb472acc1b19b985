"""Mini-scale analogue of the paper's Table 3: do backdoors survive distillation?

On CIFAR-10 from a local data root, on CPU: one clean teacher, BadNets/Blended/CKD/LBA
teachers poison-fine-tuned from it, and students distilled from each on clean data (FKD
for every attack; KD and student-only for CKD). Every stage is a run directory with its
record.json; a finished stage is skipped when the script is run again (resumable).
Writes ``OUT/summary.json`` and ``OUT/table3.md``.

    python benchmarks/table3_mini.py --data-root ../shared/data --out runs/table3-mini
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from robustkd import api
from robustkd.io import RECORD_FILE, read_json, write_json

ATTACKS = {
    "badnets": {"patch_size": 3, "patch_position": "br", "patch_pattern": "checkerboard"},
    "blended": {"alpha": 0.15, "blend_pattern": "noise"},
    "ckd": {"toxic_fraction": 0.1, "trigger_epochs": 5, "trigger_images": 2000,
            "trigger_lr": 0.005},
    "lba": {"trigger_epochs": 5, "trigger_images": 2000, "trigger_lr": 0.005},
}


def stage(out: Path, name: str, fn, **kwargs) -> dict:
    """Run one stage unless its record already exists (then reuse it)."""
    run_dir = out / name
    if (run_dir / RECORD_FILE).exists():
        print(f"[skip] {name}: {run_dir / RECORD_FILE} exists")
        return read_json(run_dir / RECORD_FILE)
    print(f"[run] {name}")
    return fn(out=run_dir, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--out", default="runs/table3-mini")
    p.add_argument("--teacher-model", default="wrn16_2")
    p.add_argument("--student-model", default="wrn16_1")
    p.add_argument("--train-fraction", type=float, default=0.2)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--attack-epochs", type=int, default=3)
    p.add_argument("--attack-lr", type=float, default=0.01)
    p.add_argument("--poison-ratio", type=float, default=0.1)
    p.add_argument("--clean-fraction", type=float, default=0.1)
    p.add_argument("--student-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--teacher-dir", default=None,
                   help="reuse an existing clean teacher run instead of training one")
    args = p.parse_args()
    out = Path(args.out)
    common = {"seed": args.seed, "device": args.device, "progress": False}
    started = time.perf_counter()

    if args.teacher_dir:
        teacher_dir = Path(args.teacher_dir)
        clean = read_json(teacher_dir / RECORD_FILE)
    else:
        teacher_dir = out / "clean-teacher"
        clean = stage(out, "clean-teacher", api.train, dataset=args.dataset,
                      data_root=args.data_root, model=args.teacher_model,
                      epochs=args.teacher_epochs, train_fraction=args.train_fraction,
                      schedule="cosine", lr=0.1, eval_every=args.teacher_epochs, **common)
    rows = [{"teacher": "clean", "method": "-", "acc": clean["metrics"]["acc"], "asr": None,
             "seconds": clean["seconds"], "stage": "teacher"}]
    student_kw = {"student": args.student_model, "clean_fraction": args.clean_fraction,
                  "epochs": args.student_epochs, "lr": 0.1, "schedule": "step",
                  "eval_every": args.student_epochs, **common}
    for attack in args.attacks.split(","):
        rec = stage(out, f"{attack}-teacher", api.attack, attack=attack,
                    teacher=str(teacher_dir), epochs=args.attack_epochs, lr=args.attack_lr,
                    poison_ratio=args.poison_ratio, train_fraction=args.train_fraction,
                    options=ATTACKS[attack], eval_every=args.attack_epochs, **common)
        rows.append({"teacher": attack, "method": "-", "acc": rec["metrics"]["acc"],
                     "asr": rec["metrics"]["asr"], "seconds": rec["seconds"],
                     "stage": "teacher"})
        methods = ["fkd", "kd", "ce"] if attack == "ckd" else ["fkd"]
        for method in methods:
            srec = stage(out, f"{attack}-{method}-student", api.distill, method=method,
                         teacher=str(out / f"{attack}-teacher"), **student_kw)
            rows.append({"teacher": attack, "method": method, "acc": srec["metrics"]["acc"],
                         "asr": srec["metrics"].get("asr"), "seconds": srec["seconds"],
                         "stage": "student"})
    summary = {"rows": rows, "settings": vars(args),
               "device": clean.get("device"), "wall_seconds": time.perf_counter() - started}
    write_json(out / "summary.json", summary)
    lines = ["| teacher | student method | ACC % | ASR % | wall time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        who = "teacher" if r["stage"] == "teacher" else f"{args.student_model} ({r['method']})"
        lines.append(f"| {r['teacher']} | {who} | {100 * r['acc']:.1f} | {asr} | "
                     f"{r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "table3.md").write_text(text)
    print(text)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
