"""Feature taps: read, and optionally replace, the outputs of named modules of any model.

Forward hooks instead of model surgery, so the same code serves the built-in CIFAR models,
torchvision/timm models or a user's own ``nn.Module``. Hooks live only inside the ``with``
block and are removed even when the block raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

Replacement = Callable[[torch.Tensor], torch.Tensor]


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Look up modules by dotted name; an unknown name lists close candidates."""
    table = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in table:
            stem = name.rsplit(".", 1)[0]
            near = [n for n in table if n and (n.startswith(stem) or stem.startswith(n))][:8]
            raise KeyError(
                f"model {type(model).__name__} has no module named {name!r}; "
                f"close names: {near or sorted(n for n in table if n)[:8]}"
            )
        found[name] = table[name]
    return found


class FeatureTap:
    """Holds the features captured during forward passes, keyed by module name."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"no feature captured for {name!r}: did the forward pass reach it?")
        return self.features[name]

    def __contains__(self, name: str) -> bool:
        return name in self.features

    def clear(self) -> None:
        self.features.clear()


@contextmanager
def tap(model: nn.Module, capture: Iterable[str] = (),
        replace: Mapping[str, Replacement] | None = None, detach: bool = False):
    """Capture outputs of modules in ``capture`` and swap outputs of those in ``replace``.

    A replaced module's captured feature is the replacement (what the rest of the network
    sees). Usage::

        with tap(model, ["block1"], replace={"block2": lambda f: 0.9 * f}) as t:
            logits = model(x)
        t["block1"]
    """
    replace = dict(replace or {})
    capture = list(capture)
    modules = resolve_modules(model, list(dict.fromkeys([*capture, *replace])))
    result = FeatureTap()
    handles = []

    def make_hook(name: str):
        fn = replace.get(name)
        keep = name in capture

        def hook(_module: nn.Module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r} returns {type(output).__name__}, not a tensor")
            if fn is not None:
                new = fn(output)
                if new.shape != output.shape:
                    raise ValueError(f"replacement for {name!r} changed the shape from "
                                     f"{tuple(output.shape)} to {tuple(new.shape)}")
                output = new
            if keep:
                result.features[name] = output.detach() if detach else output
            return output if fn is not None else None

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield result
    finally:
        for handle in handles:
            handle.remove()
