"""Feature-variance scan (the paper's Fig. 2): per-layer statistics of the per-example
feature variance on clean images, optionally against a reference model.

The paper's Finding 2 says backdoored models show >= 30% higher variance. This scan reports
what the sample supports: the ratio of means with a bootstrap 95% interval, and says
"no difference detectable" when the interval contains 1. A high ratio alone is not proof of a
backdoor (width, training length and normalisation change variance too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def describe(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(q[0]),
            "median": float(q[1]), "p90": float(q[2]), "n": int(v.numel())}


def ratio_interval(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """Ratio of means ``mean(a) / mean(b)`` and its bootstrap 95% percentile interval."""
    gen = torch.Generator().manual_seed(seed)
    a, b = a.double(), b.double()
    ia = torch.randint(0, len(a), (resamples, len(a)), generator=gen)
    ib = torch.randint(0, len(b), (resamples, len(b)), generator=gen)
    ratios = a[ia].mean(1) / b[ib].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(a.mean() / b.mean()), float(lo), float(hi)


def summarise(layers: Sequence[str], model: dict[str, torch.Tensor],
              reference: dict[str, torch.Tensor] | None,
              reference_layers: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Statistics per layer plus plain-language lines that do not overclaim."""
    stats: dict[str, Any] = {}
    lines: list[str] = []
    ref_layers = list(reference_layers or layers)
    for i, name in enumerate(layers):
        entry: dict[str, Any] = {"model": describe(model[name])}
        if reference is not None and i < len(ref_layers):
            ref = reference[ref_layers[i]]
            ratio, lo, hi = ratio_interval(model[name], ref, seed=i)
            entry.update(reference=describe(ref), ratio=ratio, ratio_ci95=[lo, hi])
            if lo <= 1.0 <= hi:
                verdict = "no difference detectable at this sample size"
            elif lo > 1.0:
                verdict = f"higher than the reference by {100 * (ratio - 1):.0f}%"
                verdict += (" (meets the paper's >= 30% pattern)" if lo >= 1.3 else
                            " (below the paper's >= 30% pattern, or not clearly above it)")
            else:
                verdict = f"lower than the reference by {100 * (1 - ratio):.0f}%"
            lines.append(f"{name}: mean variance ratio {ratio:.2f} "
                         f"(95% CI {lo:.2f}-{hi:.2f}): {verdict}.")
        else:
            d = entry["model"]
            lines.append(f"{name}: mean per-example variance {d['mean']:.4g} "
                         f"(median {d['median']:.4g}, n={d['n']}).")
        stats[name] = entry
    if reference is not None:
        lines.append("Variance differences are a weak signal: they can come from training "
                     "differences, not only from a backdoor.")
    return stats, lines


def plot_histograms(path: str | Path, layers: Sequence[str], model: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor] | None, labels: tuple[str, str],
                    reference_layers: Sequence[str] | None = None) -> Path | None:
    """One histogram panel per layer; needs matplotlib (``pip install robustkd[plot]``)."""
    from robustkd.plotting import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return None
    ref_layers = list(reference_layers or layers)
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], layers, strict=True)):
        ax.hist(model[name].numpy(), bins=30, alpha=0.6, label=labels[0])
        if reference is not None and i < len(ref_layers):
            ax.hist(reference[ref_layers[i]].numpy(), bins=30, alpha=0.6, label=labels[1])
        ax.set_title(name)
        ax.set_xlabel("per-example feature variance")
    axes[0][0].set_ylabel("examples")
    axes[0][0].legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
