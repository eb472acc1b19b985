"""Training throughput (images/s) of a model on random CIFAR-sized data through the real loop.

Median over several timed windows after warm-up, so one slow window (compile, allocator,
another process) does not decide the figure.

    python benchmarks/throughput.py --model wrn28_4 --device cuda --steps 300 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.models import build_model
from robustkd.training.classifier import classification_step
from robustkd.training.loop import autocast_for
from robustkd.training.optim import OptimConfig, build_optimizer
from robustkd.utils import describe_device, resolve_device


def measure(model_name: str, device: torch.device, *, batch_size: int, steps: int, windows: int,
            amp: bool, channels_last: bool, compile: bool, num_classes: int = 100) -> dict:
    torch.manual_seed(0)
    n = batch_size * 8
    ds = ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
                      torch.randint(0, num_classes, (n,)), [str(i) for i in range(num_classes)])
    model = build_model(model_name, num_classes=num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    step = classification_step(forward)
    opt = build_optimizer(model.parameters(), OptimConfig())
    loader = DeviceLoader(ds, batch_size, device=device, mean=(0.5,) * 3, std=(0.25,) * 3,
                          shuffle=True, augment={"kind": "crop", "pad": 4, "flip": True},
                          drop_last=True, channels_last=channels_last)

    def batches():
        while True:
            yield from loader

    it = batches()

    def run(k: int) -> None:
        for _ in range(k):
            x, y, idx = next(it)
            with autocast_for(device, amp):
                loss, _ = step(x, y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warm_started = time.perf_counter()
    run(max(3, steps // 10))
    warmup_seconds = time.perf_counter() - warm_started
    per_window = max(1, steps // windows)
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        run(per_window)
        rates.append(per_window * batch_size / (time.perf_counter() - t))
    return {"model": model_name, "device": describe_device(device), "batch_size": batch_size,
            "amp": not isinstance(autocast_for(device, amp), contextlib.nullcontext),
            "channels_last": channels_last,
            "compile": compile, "steps": per_window * windows, "warmup_seconds": warmup_seconds,
            "images_per_second_median": statistics.median(rates),
            "images_per_second_windows": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn16_2")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    result = measure(args.model, resolve_device(args.device), batch_size=args.batch_size,
                     steps=args.steps, windows=args.windows, amp=args.amp,
                     channels_last=args.channels_last, compile=args.compile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
