"""Neuron-noise poisoning: an attacker who knows the default defence prunes neurons.

ANP (the default preset's pruning) finds the few BatchNorm channels whose small
multiplicative perturbation sends clean inputs to the target, and prunes them. This attacker
poisons with a base attack (SIG, clean-label; Blended, poison-label) while every BN channel's
scale and shift are multiplied by fresh random factors ``1 + u``, ``u ~ U[-eps, eps]`` per
channel and batch (ANP's own perturbation model and bound). Like dropout over channels, the
noise makes the network spread what it learns, the backdoor included, over many channels and
makes its predictions insensitive to perturbing any few of them: what ANP looks for. The
same spreading is a candidate for backdoors that cross feature distillation, which copies
many channels at once. Evaluation (eval mode) runs without noise. The perturbations are
random, not adversarial (an adversarial inner step, as ANP's own, would double the
poisoning cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from robustkd.attacks import badnets, blended, sig  # noqa: F401  (the base attacks)
from robustkd.attacks.registry import AttackContext, AttackSpec, register_variant
from robustkd.errors import ConfigError
from robustkd.models.neurons import ANP_EPS, batchnorm_layers, perturbed_bn_output
from robustkd.settings import setting

SUFFIX = "-neuron-noise"


@contextmanager
def neuron_noise(model: nn.Module, eps: float, attack: str = "sig" + SUFFIX) -> Iterator[int]:
    """While the block runs, every affine BN of ``model`` in train mode computes ``gamma (1 +
    delta) x_hat + beta (1 + xi)`` with fresh ``delta, xi ~ U[-eps, eps]`` per channel and
    forward pass; yields the number of noisy channels. Hooks are removed on exit."""
    layers, _ = batchnorm_layers(model)
    if not layers:
        raise ConfigError(f"attack {attack} needs affine BatchNorm layers; "
                          f"{type(model).__name__} has none")

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training or eps == 0:
            return output
        c, dev = module.num_features, output.device
        delta = torch.empty(c, device=dev).uniform_(-eps, eps)
        xi = torch.empty(c, device=dev).uniform_(-eps, eps)
        return perturbed_bn_output(output, module.bias, 1 + delta, xi)

    handles = [bn.register_forward_hook(hook) for bn in layers.values()]
    try:
        yield sum(bn.num_features for bn in layers.values())
    finally:
        for handle in handles:
            handle.remove()


def with_neuron_noise(base_name: str) -> AttackSpec:
    """Register ``<base_name>-neuron-noise``: the base attack's trigger and poisoned data,
    trained under neuron noise (the trigger records the bound as ``neuron_noise``)."""
    name = base_name + SUFFIX

    def hooks(ctx: AttackContext, model: nn.Module):
        return neuron_noise(model, ctx.settings.eps, name)

    return register_variant(
        base_name, SUFFIX, setting_name="eps", setting_type=float,
        field=setting(ANP_EPS, "bound eps of the random multiplicative noise on every BN "
                               "channel's scale and shift while poisoning (ANP's eps)",
                      minimum=0.0, maximum=1.0),
        record="neuron_noise", module=__name__, training_hooks=hooks,
        description=f"{base_name} poisoned under random BN-channel noise, so that no few "
                    f"neurons carry it (an attacker who knows ANP pruning)")


NOISY_ATTACKS = tuple(with_neuron_noise(b) for b in ("sig", "blended", "badnets"))
