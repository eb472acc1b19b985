"""How strong a universal pattern LBA's trigger is on the *clean* teacher, per budget.

LBA optimises its trigger so that the clean teacher's features of triggered images match
the target class's: at a large budget that alone moves clean-model predictions (the
benchmark's floor criterion: the clean teacher under the trigger must stay <= 10% ASR).
This learns the trigger at each ``--mask-max`` on the clean teacher with the benchmark's
trigger settings and prints one JSON line per budget: the clean teacher's ASR on random
*training* images (what an attacker may look at) and on the test set (the criterion).

    python benchmarks/lba_floor_probe.py --teacher runs/bench/runs/<clean-run> \\
        --data-root ../shared/data --mask-max 0.05,0.1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustkd.attacks.registry import AttackContext, get_attack
from robustkd.data.registry import load_dataset
from robustkd.evaluation.metrics import triggered_metrics
from robustkd.experiments.scales import get_scale
from robustkd.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the clean teacher's run directory")
    p.add_argument("--data-root", default=None)
    p.add_argument("--mask-max", default="0.05,0.1", help="comma-separated budgets")
    p.add_argument("--held-out", type=int, default=2000,
                   help="random training images to measure on")
    args = p.parse_args()
    run = load_run(args.teacher)
    model = run.model.eval()
    splits = load_dataset(run.meta["dataset"]["name"], args.data_root)
    sizes = get_scale("mini").benchmark
    spec = get_attack("lba")
    base = dict(sizes.attack_options.get("lba", {}))
    held = splits.train.subset(torch.randperm(len(splits.train),
                                              generator=torch.Generator().manual_seed(1))
                               [: args.held_out])
    for m in (float(x) for x in args.mask_max.split(",")):
        start = time.perf_counter()
        settings = spec.make_settings({**base, "mask_max": m})
        trigger = spec.build_trigger(AttackContext(splits, model, settings, progress=False))
        seconds = time.perf_counter() - start
        row = {"mask_max": m, "trigger_seconds": round(seconds, 1)}
        for name, ds in (("train_heldout", held), ("test", splits.test)):
            r = triggered_metrics(model, ds, trigger, 0, splits.mean, splits.std)
            row[f"{name}_asr"] = round(100 * r["asr"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
