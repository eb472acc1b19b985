"""BatchNorm channels as neurons: where ANP perturbs and masks them, and where an attacker
who knows ANP perturbs them while poisoning. Both sides read the same formula."""

from __future__ import annotations

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# ANP's bound on the multiplicative neuron perturbation (paper and reference code): the
# defence's default, and the default of the attack that trains under such noise
ANP_EPS = 0.4


def batchnorm_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """The affine BatchNorm modules by name, and the names of non-affine ones (no gamma to
    prune, so ANP leaves them alone)."""
    found, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, BATCHNORMS):
            if module.affine:
                found[name] = module
            else:
                skipped.append(name)
    return found, skipped


def perturbed_bn_output(y: torch.Tensor, beta: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a BN output ``y = gamma x_hat + beta`` into ``gamma scale x_hat + beta (1 +
    shift)`` per channel (dim 1), with ``scale = m + delta`` and ``shift = xi``.

    Written as ``y + (scale - 1)(y - beta) + shift beta`` so that the identity (scale 1, no
    shift) returns ``y`` bit for bit, and it holds in train mode (batch statistics) too.
    """
    view = (1, -1) + (1,) * (y.dim() - 2)
    out = y + (scale - 1).view(view) * (y - beta.view(view))
    if shift is not None:
        out = out + (shift * beta).view(view)
    return out
