"""Feature taps: read, and optionally replace, the outputs of named modules of any model.

Forward hooks instead of model surgery, so the same code serves the built-in CIFAR models,
torchvision/timm models or a user's own ``nn.Module``. Hooks live only inside the ``with``
block and are removed even when the block raises.

:func:`tap` registers its hooks for one ``with`` block; :class:`PersistentTap` registers them
once for a whole run and switches them on per forward pass, so a training step adds and
removes no hooks (what ``torch.compile`` needs to keep one graph across steps).

A hook sees a module's output when it is produced; a model that later changes that tensor in
place (``out += identity``, ``nn.ReLU(inplace=True)``, as torchvision and timm ResNets do) would
leave a different value behind. Reading such a feature raises ConfigError instead of returning
the wrong numbers; :func:`disable_inplace` fixes in-place activations, and stage outputs
(``layer1`` ... of a torchvision/timm ResNet) are never modified afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from robustkd.errors import ConfigError

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
        self._versions: dict[str, int | None] = {}

    def keep(self, name: str, feature: torch.Tensor) -> None:
        """Store ``feature`` with its version counter, to detect later in-place changes."""
        self.features[name] = feature
        self._versions[name] = _version(feature)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"no feature captured for {name!r}: did the forward pass reach it?")
        feature = self.features[name]
        version = self._versions.get(name)
        if version is not None and _version(feature) != version:
            raise ConfigError(
                f"the output of {name!r} was changed in place later in the forward pass (e.g. "
                "`out += identity` or an inplace ReLU), so it is not that module's output any "
                "more; call robustkd.models.taps.disable_inplace(model) for inplace "
                "activations, or tap a module whose output is left alone (e.g. a stage "
                "such as 'layer1' of a torchvision/timm ResNet)")
        return feature

    def __contains__(self, name: str) -> bool:
        return name in self.features

    def clear(self) -> None:
        self.features.clear()
        self._versions.clear()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def disable_inplace(model: nn.Module) -> int:
    """Turn off ``inplace`` on every module that has the flag (ReLU, ReLU6, SiLU, Dropout...).

    torchvision/timm models apply activations in place; tapping the BatchNorm before such an
    activation then captures the activated tensor. Returns how many modules were changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed += 1
    return changed


def _hook(name: str, result: FeatureTap, fn: Replacement | None, keep: bool, detach: bool,
          active: Callable[[], bool] = lambda: True):
    """The forward hook behind both taps: replace, then capture, the output of ``name``."""

    def hook(_module: nn.Module, _inputs, output):
        if not active():
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"module {name!r} returns {type(output).__name__}, not a tensor")
        if fn is not None:
            new = fn(output)
            if new.shape != output.shape:
                raise ValueError(f"replacement for {name!r} changed the shape from "
                                 f"{tuple(output.shape)} to {tuple(new.shape)}")
            output = new
        if keep:
            result.keep(name, output.detach() if detach else output)
        return output if fn is not None else None

    return hook


class PersistentTap:
    """Hooks registered once; they act only inside :meth:`recording`. Close it (or use it as
    a context manager) to remove them.

    ::

        taps = PersistentTap(student, ["block1"])
        for x in batches:
            with taps.recording() as t:
                logits = student(x)
            t["block1"]
        taps.close()
    """

    def __init__(self, model: nn.Module, capture: Iterable[str] = (),
                 replace: Mapping[str, Replacement] | None = None,
                 detach: bool = False) -> None:
        replace = dict(replace or {})
        capture = list(capture)
        modules = resolve_modules(model, list(dict.fromkeys([*capture, *replace])))
        self.result = FeatureTap()
        self.active = False
        self._handles = [
            module.register_forward_hook(_hook(name, self.result, replace.get(name),
                                               name in capture, detach, self._is_active))
            for name, module in modules.items()]

    def _is_active(self) -> bool:
        return self.active

    @contextmanager
    def recording(self) -> Iterator[FeatureTap]:
        self.result.clear()
        self.active = True
        try:
            yield self.result
        finally:
            self.active = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PersistentTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(
                _hook(name, result, replace.get(name), name in capture, detach)))
        yield result
    finally:
        for handle in handles:
            handle.remove()
