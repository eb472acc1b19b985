"""How close the distillation loop runs to its bare compute (images/s), per method.

(a) bare: teacher forward without grad + student forward/backward + optimiser step on one
static, already-normalised batch; (b) loop: ``distill_student`` for one epoch of random
CIFAR-sized images (batching, augmentation, taps, the method's loss, connectors, logging);
between them, the method's own step on the static batch (its loss with connectors and
margins, no loop), which splits (b)'s cost into what the method computes and what the loop
adds. All in one process, the same models, batch size, precision and memory format
(channels_last, as ``robustkd distill`` runs them unless ``--no-channels-last``); each figure
is the median of ``--repeats`` timings after a warm-up. One JSON line per method:
``method, bare_img_s, loop_img_s, ratio`` (the loop's epoch as it times itself),
``method_img_s, method_ratio, loop_to_method``, and ``call_img_s, call_ratio`` (the whole
``distill_student`` call, with the run's one-off setup, which a short timed epoch
overweights).

``robustkd`` is the default preset's distillation step: its teacher is first transformed as
the preset says (cleaned by ``cfg.prune`` - a few ANP mask batches or one FST epoch: the
transform is a one-off cost, timed end to end by the benchmark, not a step cost) and then
distilled by FKD; a preset that trains masks or synthesises triggers is refused, since its
step is not FKD's.

    python benchmarks/step_overhead.py --device cpu --methods fkd,kd,robustkd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from contextlib import closing

import torch
import torch.nn.functional as F

from robustkd.api.models import prepare_model
from robustkd.data.dataset import ImageDataset
from robustkd.defenses.registry import DefenseContext, defend_teacher, get_teacher_defense
from robustkd.defenses.robustkd import robustkd_config
from robustkd.distill import DistillRun, build_distiller, distill_student
from robustkd.models import build_model
from robustkd.models.layers import frozen_teacher
from robustkd.training.host_memory import keep_freed_memory
from robustkd.training.loop import autocast_for, bf16_in_effect
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig, build_optimizer
from robustkd.utils import describe_device, resolve_device

MEAN, STD = (0.5,) * 3, (0.25,) * 3
AUGMENT = {"kind": "crop", "pad": 4, "flip": True}


def random_images(n: int, classes: int, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, classes, (n,), generator=g),
                        [str(i) for i in range(classes)])


def static_batch(batch_size: int, classes: int, device, channels_last: bool):
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch_size,), device=device)


def timed_rate(loss_of_batch, params, device, batch_size: int, steps: int, amp: bool) -> float:
    """Images/s of ``steps`` optimiser steps on the static batch's ``loss_of_batch()``, after
    two warm-up steps."""
    opt = build_optimizer(params, OptimConfig())

    def step() -> None:
        with autocast_for(device, amp):
            loss = loss_of_batch()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def bare_rate(teacher, student, device, batch_size: int, steps: int, amp: bool,
              classes: int, channels_last: bool) -> float:
    """Images/s of the compute alone: no data movement, no taps, a logit loss."""
    x, y = static_batch(batch_size, classes, device, channels_last)
    teacher.eval()
    student.train()

    def loss() -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        return F.cross_entropy(s, y) + F.mse_loss(s.float(), t.float())

    return timed_rate(loss, student.parameters(), device, batch_size, steps, amp)


def method_rate(method: str, teacher, student, device, batch_size: int, steps: int,
                amp: bool, classes: int, channels_last: bool) -> float:
    """Images/s of the method's own step on the static batch: the bare compute plus what the
    method adds to it (FKD: the teacher's BN on batch statistics, connectors, margins, the
    partial L2), without the loop around it (batching, augmentation, logging, callbacks)."""
    x, y = static_batch(batch_size, classes, device, channels_last)
    distiller = build_distiller(method, teacher, student)
    with frozen_teacher(teacher, distiller.teacher_mode()), closing(distiller):
        distiller.prepare(x)
        distiller.to(device)
        distiller.total_steps = steps + 2
        student.train()
        distiller.train()
        params = list(student.parameters()) + list(distiller.parameters())
        return timed_rate(lambda: distiller.loss(x, y)[0], params, device, batch_size, steps,
                          amp)


# the teacher transform's shortest useful settings (its cost is not the step's)
SHORT_TRANSFORM = {"iterations": 4, "epochs": 1}


def step_models(method: str, teacher, data: ImageDataset, device, amp: bool,
                channels_last: bool):
    """The teacher and the distillation method a timed step of ``method`` runs."""
    if method != "robustkd":
        return teacher, method
    cfg = robustkd_config()
    if not cfg.only_prunes():
        raise SystemExit("step_overhead: the default RobustKD preset is not a pruned "
                         "teacher + FKD; time it with the benchmark instead")
    ctx = DefenseContext(clean=data, mean=MEAN, std=STD, augment=AUGMENT, device=device,
                         amp=amp, channels_last=channels_last, progress=False)
    spec = get_teacher_defense(cfg.prune)
    short = {k: v for k, v in SHORT_TRANSFORM.items()
             if k in {f.name for f in dataclasses.fields(spec.settings)}}
    pruned, _ = defend_teacher(cfg.prune, teacher, ctx, short)
    return pruned, "fkd"


def loop_rate(method: str, teacher, student, data: ImageDataset, device, batch_size: int,
              amp: bool, channels_last: bool, compile: bool = False) -> tuple[float, float]:
    """Images/s of one epoch of the loop as the loop times it (batching, augmentation, taps,
    loss, connectors, optimiser, logging), and of the whole call, which adds the run's
    one-off setup (connectors and margins sized on a probe batch, hooks registered)."""
    started = time.perf_counter()
    loop = LoopSettings(mean=MEAN, std=STD, augment=AUGMENT, batch_size=batch_size,
                        device=device, amp=amp, channels_last=channels_last, compile=compile,
                        progress=False)
    history, _ = distill_student(teacher, student, data, None, loop=loop,
                                 run=DistillRun(epochs=1, eval_every=0), method=method)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    call = len(data) / (time.perf_counter() - started)
    return history[0].images_per_second, call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default="wrn16_2")
    p.add_argument("--student", default="wrn16_1")
    p.add_argument("--methods", default="fkd,kd")
    p.add_argument("--images", type=int, default=2560, help="images per timed loop epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--compile", action="store_true",
                   help="the loop with distill's --compile (its loss compiled); the bare "
                        "step stays eager")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   default=None, help="contiguous tensors (distill's --no-channels-last; "
                                      "else distill's default)")
    args = p.parse_args()
    device = resolve_device(args.device)
    kept = keep_freed_memory() if device.type == "cpu" else False  # as the loop does: both alike
    bf16 = bf16_in_effect(device, args.amp)
    classes = 10
    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes=classes)
    student = build_model(args.student, num_classes=classes)
    cl = prepare_model(teacher, device, args.channels_last)  # distill's default, in one place
    prepare_model(student, device, cl)
    data = random_images(args.images, classes)
    steps = max(1, args.images // args.batch_size)
    for method in args.methods.split(","):
        step_teacher, step_method = step_models(method, teacher, data, device, args.amp, cl)
        loop_rate(step_method, step_teacher, student, random_images(2 * args.batch_size, classes),
                  device, args.batch_size, args.amp, cl, args.compile)  # warm-up
        bare, own, loop, call = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell hits all alike
            bare.append(bare_rate(step_teacher, student, device, args.batch_size, steps, args.amp,
                                  classes, cl))
            own.append(method_rate(step_method, step_teacher, student, device, args.batch_size,
                                   steps, args.amp, classes, cl))
            epoch_rate, call_rate = loop_rate(step_method, step_teacher, student, data, device,
                                              args.batch_size, args.amp, cl, args.compile)
            loop.append(epoch_rate)
            call.append(call_rate)
        b, lo, c = statistics.median(bare), statistics.median(loop), statistics.median(call)
        m = statistics.median(own)
        print(json.dumps({"method": method, "bare_img_s": round(b, 1),
                          "loop_img_s": round(lo, 1), "ratio": round(lo / b, 3),
                          "method_img_s": round(m, 1), "method_ratio": round(m / b, 3),
                          "loop_to_method": round(lo / m, 3),
                          "call_img_s": round(c, 1), "call_ratio": round(c / b, 3),
                          "device": describe_device(device), "amp": args.amp,
                          "bf16": bf16, "freed_memory_kept": kept,
                          "channels_last": cl, "compile": args.compile,
                          "threads": torch.get_num_threads(), "repeats": args.repeats,
                          "images": args.images, "batch_size": args.batch_size}), flush=True)


if __name__ == "__main__":
    main()
