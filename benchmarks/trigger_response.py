"""How strong must a trigger be before a model sends an image to the target?

For a backdoored teacher run and any of its students or defended copies, the share of
non-target test images classified as the target (ASR) when the trigger is applied at
strength t, ``x + t * (T(x) - x)``, for t from 0 to 1, and ``t50``: the weakest strength at
which half of them reach the target (linear interpolation; ``null`` when even the full
trigger does not). A student that feature distillation gave the backdoor fires at a higher
t50 than its teacher; the measurement says how much margin a teacher's backdoor keeps.

    python benchmarks/trigger_response.py --teacher runs/bench/runs/<teacher> \\
        --model runs/bench/runs/<fkd student> --defended runs/bench/runs/<finetune cell>

``--model`` reads a run's own model; ``--defended`` reads the teacher copy a defence cell
saved (``defended_teacher.safetensors``). One JSON line per model.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from robustkd.api.data import run_data
from robustkd.data.loader import normalize
from robustkd.runs import load_run

STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@torch.no_grad()
def response(model: torch.nn.Module, images: torch.Tensor, triggered: torch.Tensor,
             target: int, mean: Sequence[float], std: Sequence[float], batch: int = 500
             ) -> list[float]:
    """ASR at every strength of :data:`STRENGTHS`."""
    model.eval()
    out = []
    for t in STRENGTHS:
        hits = 0
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            x = x + t * (triggered[i:i + batch] - x)
            hits += int((model(normalize(x, mean, std)).argmax(1) == target).sum())
        out.append(hits / len(images))
    return out


def t50(curve: list[float]) -> float | None:
    """The weakest strength at which the curve reaches 0.5 (linear between the points)."""
    if len(curve) != len(STRENGTHS):
        raise ValueError(f"a curve has {len(STRENGTHS)} points, got {len(curve)}")
    for i in range(1, len(curve)):
        (t0, a0), (t1, a1) = (STRENGTHS[i - 1], curve[i - 1]), (STRENGTHS[i], curve[i])
        if a0 < 0.5 <= a1:
            return round(t0 + (0.5 - a0) * (t1 - t0) / (a1 - a0), 3)
    return 0.0 if curve[0] >= 0.5 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the backdoored teacher's run")
    p.add_argument("--model", action="append", default=[], help="a run whose model to read")
    p.add_argument("--defended", action="append", default=[],
                   help="a defence cell whose defended teacher copy to read")
    p.add_argument("--data-root", default=None)
    p.add_argument("--images", type=int, default=2000, help="test images (non-target)")
    p.add_argument("--seed", type=int, default=0, help="which test images")
    args = p.parse_args()
    teacher = load_run(args.teacher, "cpu")
    if teacher.trigger is None or teacher.target is None:
        raise SystemExit(f"--teacher {args.teacher}: the run has no trigger")
    splits, _ = run_data(teacher.meta, args.data_root)
    keep = torch.nonzero(splits.test.labels != teacher.target).flatten()
    pick = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(args.seed))]
    images = splits.test.images[pick[:args.images]].float() / 255
    triggered = teacher.trigger.apply(images)
    models = [("teacher", args.teacher, teacher.model)]
    models += [("model", r, load_run(r, "cpu").model) for r in args.model]
    for r in args.defended:
        m = copy.deepcopy(teacher.model)
        m.load_state_dict(load_file(str(Path(r) / "defended_teacher.safetensors")))
        models.append(("defended", r, m))
    for kind, run, model in models:
        curve = response(model, images, triggered, teacher.target, splits.mean, splits.std)
        print(json.dumps({"kind": kind, "run": Path(run).name, "images": len(images),
                          "strengths": list(STRENGTHS), "asr": [round(a, 3) for a in curve],
                          "t50": t50(curve)}), flush=True)


if __name__ == "__main__":
    main()
