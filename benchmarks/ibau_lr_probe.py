"""One I-BAU round on a teacher, printing the outer loss per Adam step and the teacher's
accuracy on held-out *training* images before and after (no test data, no trigger).

Why: I-BAU at the reference's Adam lr took the benchmark's SIG teacher from 83 to 52% test
ACC; this shows where (the first step) and whether the implicit term or bf16 matter.

    OMP_NUM_THREADS=1 python benchmarks/ibau_lr_probe.py --teacher RUN --data-root DIR \
        [--lr 1e-3] [--k 5] [--no-amp]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from robustkd.data.registry import load_dataset
from robustkd.data.subsets import per_class_subset
from robustkd.defenses import ibau
from robustkd.defenses.registry import DefenseContext, trainable_copy
from robustkd.evaluation.metrics import accuracy
from robustkd.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--lr", type=float, default=ibau.IBAUSettings().lr)
    ap.add_argument("--k", type=int, default=5, help="fixed-point iterations; 0: plain CE")
    ap.add_argument("--images", type=float, default=0.05, help="per-class share unlearned on")
    ap.add_argument("--no-amp", action="store_true")
    args = ap.parse_args()

    amp = not args.no_amp
    run = load_run(args.teacher)
    sp = load_dataset(args.dataset, args.data_root)
    clean = per_class_subset(sp.train, fraction=args.images, seed=0)
    held = per_class_subset(sp.train, fraction=0.02, seed=7)
    ctx = DefenseContext(clean=clean, mean=sp.mean, std=sp.std, augment=sp.augment, amp=amp,
                         progress=False)
    cfg = ibau.IBAUSettings(hypergrad_iterations=max(args.k, 1), lr=args.lr)
    model = trainable_copy(run.model).eval()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    mean, std = torch.tensor(sp.mean), torch.tensor(sp.std)
    print("held acc before", accuracy(model, held, sp.mean, sp.std), flush=True)
    loader = ctx.loader(cfg.batch_size)
    shape = (sp.train.channels, *sp.train.image_size)
    delta, adv = ibau.universal_perturbation(
        model, ibau._cycle(loader, len(loader)), shape=shape, mean=mean, std=std,
        radius=cfg.radius, lr=cfg.inner_lr, reg=cfg.inner_reg, amp=amp)
    print("adv ce", float(adv), "norm", float(delta.norm()), flush=True)
    started, losses = time.time(), []
    for x, y, _ in loader:
        rows = torch.zeros(x.shape[0], dtype=torch.bool)
        rows[0] = True
        if args.k == 0:
            with ibau.autocast_for(x.device, amp):
                logits = model(ibau.perturb(x, delta, mean, std, rows))
            loss = F.cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss, params)
        else:
            grads, loss = ibau.unlearn_step(model, params, x, y, delta, rows, cfg, mean, std,
                                            amp)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss.detach()), 3))
    print("losses", losses, "s", round(time.time() - started), flush=True)
    print("held acc after", accuracy(model, held, sp.mean, sp.std), flush=True)


if __name__ == "__main__":
    main()
