"""Blind probe: does a targeted universal perturbation single out a backdoor's target on a
distilled student? No trigger, no target: per class c, one additive perturbation
(|delta| <= eps in pixels) is fitted on clean held-out images to send them to c; a
backdoored student should reach one class far more easily than the others (robust z).

    OMP_NUM_THREADS=1 python benchmarks/uap_scan_probe.py --data-root ../shared/data \\
        --runs runs/val/sig-scratch-fkd-s0 runs/bench/runs/<student> ...
The target each run's teacher was attacked with is read only to print it beside the result.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from robustkd.data import load_dataset
from robustkd.data.loader import normalize
from robustkd.data.subsets import per_class_subset, split_validation
from robustkd.defenses.inversion import robust_z
from robustkd.runs import load_run
from robustkd.training.loop import autocast_for


def targeted_uap(model, images: torch.Tensor, labels: torch.Tensor, target: int, mean, std,
                 eps: float, epochs: int, step: float, batch: int, lowres: int = 0) -> float:
    """Fit one perturbation sending ``images`` to ``target``; its success on the images
    whose label is not ``target``."""
    side = images.shape[-1]
    shape = (images.shape[1], lowres, lowres) if lowres else images.shape[1:]
    param = torch.zeros(shape, requires_grad=True)

    def full(d: torch.Tensor) -> torch.Tensor:  # a low-resolution pattern, upsampled
        return (F.interpolate(d[None], size=(side, side), mode="bilinear",
                              align_corners=False)[0] if lowres else d)
    want = torch.full((batch,), target, dtype=torch.long)
    for _ in range(epochs):
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            with autocast_for(torch.device("cpu"), True):
                logits = model(normalize((x + full(param)).clamp(0, 1), mean, std))
            loss = F.cross_entropy(logits.float(), want[:len(x)])
            (grad,) = torch.autograd.grad(loss, param)
            with torch.no_grad():
                param.sub_(step * grad.sign()).clamp_(-eps, eps)
    delta = full(param.detach())
    keep = labels != target
    with torch.no_grad(), autocast_for(torch.device("cpu"), True):
        pred = model(normalize((images[keep] + delta).clamp(0, 1), mean, std)).argmax(1)
    return float((pred == target).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--step", type=float, default=0.01)
    p.add_argument("--lowres", type=int, default=0,
                   help="fit the perturbation as an N x N pattern, upsampled (0: full size)")
    args = p.parse_args()
    splits = load_dataset("cifar10", args.data_root)
    _, val = split_validation(per_class_subset(splits.train, fraction=0.2, seed=0), 0.1, seed=0)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:args.images]
    images = val.images[pick].float() / 255
    labels = val.labels[pick]
    for run_dir in args.runs:
        run = load_run(run_dir)
        model = run.model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        success = torch.tensor([targeted_uap(model, images, labels, c, run.mean, run.std,
                                             args.eps, args.epochs, args.step, 100, args.lowres)
                                for c in range(10)])
        z = robust_z(success)
        teacher = run.meta.get("distillation", {}).get("teacher")
        print(json.dumps({"run": str(run_dir), "teacher": teacher,
                          "success": [round(float(s), 3) for s in success],
                          "top": int(success.argmax()), "top_z": round(float(z.max()), 2),
                          "z_of_0": round(float(z[0]), 2)}), flush=True)


if __name__ == "__main__":
    main()
