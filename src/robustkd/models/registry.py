"""Model names -> constructors, so configs and checkpoints can name a model by a string.

A name is matched (whole, case-insensitively) against registered regular expressions; named
groups in the pattern become arguments of the factory. Every built model records ``arch`` and
``arch_kwargs`` (JSON-serialisable, defaults filled in) so that
``build_model(model.arch, **model.arch_kwargs)`` rebuilds the same network from a checkpoint.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.imagenet_resnet import RESNET_CONFIGS, ImageNetResNet
from robustkd.models.mobilenetv2 import MobileNetV2
from robustkd.models.pyramidnet import PyramidNet
from robustkd.models.resnet import CifarResNet
from robustkd.models.wrn import WideResNet

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    pattern: re.Pattern[str]
    factory: ModelFactory
    usage: str
    listed: tuple[str, ...]


_REGISTRY: list[_Entry] = []


def register_model(name_or_pattern: str, *, usage: str | None = None,
                   listed: Sequence[str] | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory under a fixed name or a regex with named groups.

    The factory is called as ``factory(**groups, num_classes=..., in_channels=..., **options)``;
    group values arrive as strings. ``usage`` is how the name appears in error messages and
    ``listed`` the concrete names :func:`list_models` reports (default: the name itself when it
    is a plain name). Later registrations take precedence, so a user can override a built-in.
    """
    pattern = re.compile(name_or_pattern, re.IGNORECASE)
    plain = re.fullmatch(r"[A-Za-z0-9_\-]+", name_or_pattern) is not None
    if listed is None:
        listed = (name_or_pattern,) if plain else ()

    def decorator(factory: ModelFactory) -> ModelFactory:
        _REGISTRY.insert(0, _Entry(pattern, factory, usage or name_or_pattern, tuple(listed)))
        return factory

    return decorator


def list_models() -> list[str]:
    """Canonical model names (patterns such as ``wrn{depth}_{k}`` accept more)."""
    names: list[str] = []
    for entry in reversed(_REGISTRY):
        names.extend(n for n in entry.listed if n not in names)
    return names


def _usage() -> str:
    return "; ".join(e.usage for e in reversed(_REGISTRY))


def _resolve(name: str) -> tuple[_Entry, dict[str, str]]:
    for entry in _REGISTRY:
        match = entry.pattern.fullmatch(name)
        if match:
            return entry, match.groupdict()
    raise ConfigError(
        f"unknown model {name!r}; known names: {', '.join(list_models())}; "
        f"accepted forms: {_usage()}"
    )


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model and stamp ``arch``/``arch_kwargs`` on it for checkpoints.

    Unknown names, invalid depths and options the model does not take raise ConfigError
    rather than TypeError, so a bad config fails with a message that names the fix.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    arch = name.strip().lower()
    entry, groups = _resolve(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{arch}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"{arch}: in_channels must be a positive integer, got {in_channels!r}")

    signature = inspect.signature(entry.factory)
    clash = sorted(set(kwargs) & set(groups))
    if clash:
        raise ConfigError(f"{arch}: {', '.join(clash)} is fixed by the name; drop the option")
    try:
        bound = signature.bind(**groups, num_classes=num_classes, in_channels=in_channels,
                               **kwargs)
    except TypeError as exc:
        options = [p for p in signature.parameters
                   if p not in groups and p not in ("num_classes", "in_channels")]
        raise ConfigError(
            f"{arch}: {exc}; options this model takes: {', '.join(options) or 'none'}"
        ) from None
    bound.apply_defaults()
    arch_kwargs = {k: v for k, v in bound.arguments.items() if k not in groups}
    try:
        json.dumps(arch_kwargs)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{arch}: options must be JSON-serialisable to be stored in a checkpoint, "
            f"got {arch_kwargs!r}"
        ) from None

    try:
        model = entry.factory(**bound.arguments)
    except ConfigError as exc:
        raise ConfigError(f"{arch}: {exc}") from exc
    model.arch = arch
    model.arch_kwargs = arch_kwargs
    model.classifier_name = getattr(model, "classifier_name", "fc")
    if not callable(getattr(model, "distill_layers", None)):
        raise ConfigError(f"{arch}: model factory returned a model without distill_layers()")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once), as papers report model size."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


# --- built-in models ---------------------------------------------------------------------------


@register_model(
    r"wrn(?P<depth>\d+)_(?P<k>\d+)",
    usage="wrn{depth}_{k} (WRN-depth-k, depth 6n+4; option dropout)",
    listed=("wrn10_1", "wrn10_2", "wrn16_1", "wrn16_2", "wrn16_4", "wrn16_8", "wrn28_2",
            "wrn28_4", "wrn28_10", "wrn40_1", "wrn40_2", "wrn40_4"),
)
def _wrn(depth: str, k: str, num_classes: int, in_channels: int = 3,
         dropout: float = 0.0) -> nn.Module:
    return WideResNet(int(depth), int(k), num_classes, in_channels, dropout=dropout)


@register_model(
    r"resnet(?P<depth>\d+)",
    usage="resnet{depth} (CIFAR ResNet, depth 6n+2)",
    listed=("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"),
)
def _resnet(depth: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(int(depth), num_classes, in_channels)


@register_model(
    "pyramidnet",
    usage="pyramidnet (options depth, alpha, bottleneck)",
    listed=(),
)
def _pyramidnet(num_classes: int, depth: int, alpha: float, in_channels: int = 3,
                bottleneck: bool = False) -> nn.Module:
    return PyramidNet(depth, alpha, num_classes, in_channels, bottleneck=bottleneck)


@register_model("pyramidnet110", usage="pyramidnet110 (alpha 84, basic blocks)")
def _pyramidnet110(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PyramidNet(110, 84, num_classes, in_channels, bottleneck=False)


@register_model("pyramidnet200", usage="pyramidnet200 (alpha 240, bottleneck blocks)")
def _pyramidnet200(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PyramidNet(200, 240, num_classes, in_channels, bottleneck=True)


@register_model(
    r"imagenet_resnet(?P<depth>\d+)",
    usage="imagenet_resnet{depth} (ImageNet ResNet, depth 18, 34, 50, 101 or 152; "
          "option small_input)",
    listed=("imagenet_resnet18", "imagenet_resnet50"),
)
def _imagenet_resnet(depth: str, num_classes: int, in_channels: int = 3,
                     small_input: bool = False) -> nn.Module:
    if int(depth) not in RESNET_CONFIGS:
        raise ConfigError(f"ImageNet ResNet depth must be one of {sorted(RESNET_CONFIGS)}, "
                          f"got {depth}")
    return ImageNetResNet(int(depth), num_classes, in_channels, small_input=small_input)


@register_model("mobilenetv2", usage="mobilenetv2 (options width_mult, small_input, dropout)")
def _mobilenetv2(num_classes: int, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = False, dropout: float = 0.2) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, width_mult=width_mult, small_input=small_input,
                       dropout=dropout)
