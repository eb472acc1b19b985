"""Seconds per epoch of FKD and RobustKD distillation at the paper's scale, on one GPU.

WRN-28-4 teacher -> WRN-16-2 student on CIFAR-100-sized random data (50k images per epoch,
100 classes, 32x32), batch 128, through the library's real loop (``distill_student``,
``train_detox_masks``). Random weights: speed does not depend on what a model learned.
Each setting runs a few short epochs of ``--images`` images; the figure is the median
images/s of the epochs after the first (warm-up), converted to seconds per 50k images.
(Compiled vs eager classifier training: ``benchmarks/throughput.py --compile``.)

    python benchmarks/gpu_speed.py --device cuda --out runs/gpu-speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from robustkd.data.dataset import ImageDataset
from robustkd.defenses.detox import train_detox_masks
from robustkd.defenses.robustkd import RobustKDConfig, detox_layer_names
from robustkd.distill.run import FKD_SCHEDULE, DistillRun, distill_student
from robustkd.io import write_json
from robustkd.models import build_model
from robustkd.training.loop_settings import LoopSettings
from robustkd.utils import describe_device, resolve_device

EPOCH_IMAGES = 50_000
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
AUGMENT = {"kind": "crop", "pad": 4, "flip": True}


def random_data(n: int, classes: int) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, classes, (n,), generator=g),
                        [str(i) for i in range(classes)])


def seconds_per_epoch(history) -> float:
    rates = [h.images_per_second for h in history[1:]] or [history[0].images_per_second]
    return EPOCH_IMAGES / statistics.median(rates)


def models(teacher: str, student: str, classes: int, device, channels_last: bool):
    t = build_model(teacher, num_classes=classes).to(device)
    s = build_model(student, num_classes=classes).to(device)
    if channels_last:
        t, s = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return t, s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="wrn28_4")
    p.add_argument("--student", default="wrn16_2")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=128 * 60)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--compile", action="store_true",
                   help="also FKD with the loss under torch.compile (bf16, channels-last) at "
                        "each of --batch-sizes")
    p.add_argument("--batch-sizes", default="128",
                   help="comma-separated batch sizes of the compiled rows (lr scaled "
                        "linearly from 0.1 at 128)")
    args = p.parse_args()
    device = resolve_device(args.device)
    data = random_data(args.images, args.classes)
    results: dict = {"device": describe_device(device), "teacher": args.teacher,
                     "student": args.student, "classes": args.classes, "batch_size": 128,
                     "images_per_timed_epoch": args.images, "rows": []}

    def record(row: dict) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(args.out, results)

    for amp in (True, False):
        for channels_last in (True, False):
            if not amp and not channels_last:
                continue
            t, s = models(args.teacher, args.student, args.classes, device, channels_last)
            started = time.perf_counter()
            loop = LoopSettings(mean=MEAN, std=STD, augment=AUGMENT, device=device, amp=amp,
                                channels_last=channels_last, progress=False)
            run = DistillRun(epochs=args.epochs, optim=FKD_SCHEDULE)
            hist, _ = distill_student(t, s, data, None, loop=loop, run=run)
            record({"stage": "fkd distill", "bf16": amp, "channels_last": channels_last,
                    "seconds_per_50k_epoch": seconds_per_epoch(hist),
                    "wall_seconds": time.perf_counter() - started})
            if amp and channels_last:
                names = detox_layer_names(t, "all")
                masks, dhist = train_detox_masks(t, data, names,
                                                 RobustKDConfig(detox_epochs=args.epochs).detox(0.2),
                                                 loop)
                record({"stage": "robustkd detox (masks)", "bf16": False,
                        "channels_last": channels_last,
                        "seconds_per_50k_epoch": seconds_per_epoch(dhist)})
                s2 = models(args.teacher, args.student, args.classes, device, channels_last)[1]
                hist, _ = distill_student(t, s2, data, None, loop=loop, run=run,
                                          teacher_replace=masks.replacements())
                record({"stage": "robustkd distill (masks active)", "bf16": amp,
                        "channels_last": channels_last,
                        "seconds_per_50k_epoch": seconds_per_epoch(hist)})
    for batch in (int(b) for b in args.batch_sizes.split(",")) if args.compile else ():
        t, s = models(args.teacher, args.student, args.classes, device, True)
        loop = LoopSettings(mean=MEAN, std=STD, augment=AUGMENT, device=device,
                            batch_size=batch, channels_last=True, progress=False,
                            compile=True)
        optim = dataclasses.replace(FKD_SCHEDULE, lr=0.1 * batch / 128)
        started = time.perf_counter()
        hist, _ = distill_student(t, s, data, None, loop=loop,
                                  run=DistillRun(epochs=args.epochs, optim=optim))
        record({"stage": "fkd distill (compiled loss)", "bf16": True, "channels_last": True,
                "batch_size": batch, "seconds_per_50k_epoch": seconds_per_epoch(hist),
                "wall_seconds": time.perf_counter() - started})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
