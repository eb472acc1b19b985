"""Model zoo: sizes match the paper, shapes, distillation points and rebuild from a checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models import DistillLayer, build_model, count_parameters, list_models

# Table 2 of the paper: parameters on 100 classes.
PAPER_PARAMS = {
    "wrn28_4": 5.87e6,
    "wrn16_4": 2.77e6,
    "wrn28_2": 1.47e6,
    "wrn16_2": 0.70e6,
    "resnet56": 0.86e6,
    "pyramidnet200": 26.84e6,
    "pyramidnet110": 3.91e6,
}

SMALL = [
    ("wrn16_1", {}),
    ("wrn10_2", {"dropout": 0.3}),
    ("resnet20", {}),
    ("resnet8", {}),
    ("pyramidnet", {"depth": 14, "alpha": 12, "bottleneck": False}),
    ("pyramidnet", {"depth": 11, "alpha": 12, "bottleneck": True}),
]
SMALL_IDS = [f"{name}-{kw.get('depth', '')}{'b' if kw.get('bottleneck') else ''}"
             for name, kw in SMALL]


def _capture(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of named modules, kept by reference (catches in-place ops that overwrite them)."""
    table = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = [
        table[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o))
        for n in dict.fromkeys(names)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_paper(name: str) -> None:
    model = build_model(name, num_classes=100)
    assert count_parameters(model) == pytest.approx(PAPER_PARAMS[name], rel=0.02)


@pytest.mark.parametrize(("name", "kwargs"), SMALL, ids=SMALL_IDS)
def test_forward_shapes(name: str, kwargs: dict) -> None:
    model = build_model(name, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model(name, num_classes=7, in_channels=1, **kwargs).eval()
    with torch.no_grad():
        for size in (16, 64, 28):
            assert gray(torch.randn(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize(("name", "kwargs"), SMALL, ids=SMALL_IDS)
def test_distill_layers_exist_and_shrink(name: str, kwargs: dict) -> None:
    model = build_model(name, num_classes=10, **kwargs).eval()
    assert model.classifier_name == "fc"
    assert isinstance(model.fc, nn.Linear)
    layers = model.distill_layers()
    assert len(layers) == 3
    modules = dict(model.named_modules())
    for layer in layers:
        assert isinstance(layer, DistillLayer)
        assert layer.stage in modules and layer.prerelu in modules
        assert layer.bn is not None and isinstance(modules[layer.bn], nn.BatchNorm2d)

    names = [n for layer in layers for n in (layer.stage, layer.prerelu)]
    with torch.no_grad():
        feats = _capture(model, names, torch.randn(2, 3, 32, 32))
    stages = [feats[layer.stage] for layer in layers]
    channels = [f.shape[1] for f in stages]
    sizes = [f.shape[-1] for f in stages]
    assert channels == sorted(channels) and channels[0] < channels[-1]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for layer, stage in zip(layers, stages, strict=True):
        pre = feats[layer.prerelu]
        assert pre.shape == stage.shape
        assert (pre < 0).any(), f"{layer.prerelu} output has no negatives: overwritten in place?"


def test_wrn_prerelu_is_the_bn() -> None:
    model = build_model("wrn16_1", num_classes=10).eval()
    layers = model.distill_layers()
    assert [layer.stage for layer in layers] == ["block1", "block2", "block3"]
    assert [layer.prerelu for layer in layers] == ["block2.layer.0.bn1", "block3.layer.0.bn1",
                                                   "bn1"]
    assert all(layer.prerelu == layer.bn for layer in layers)
    # The BN reads the stage output directly: hooking either gives the same value.
    with torch.no_grad():
        feats = _capture(model, ["block1", "block2.layer.0.bn1"], torch.randn(2, 3, 32, 32))
        bn = model.block2.layer[0].bn1
        assert torch.allclose(bn(feats["block1"]), feats["block2.layer.0.bn1"])
    names = dict(model.named_modules())
    for expected in ("conv1", "block1.layer.0.conv1", "block1.layer.0.bn2",
                     "block1.layer.1.conv2", "block2.layer.0.shortcut", "bn1", "fc"):
        assert expected in names
    assert "block1.layer.0.shortcut" not in names  # same width and stride: identity


def test_resnet_prerelu_has_negatives_stage_does_not() -> None:
    model = build_model("resnet20", num_classes=10).eval()
    layers = model.distill_layers()
    assert [(d.stage, d.prerelu, d.bn) for d in layers] == [
        (f"layer{i}", f"layer{i}.2.preact", f"layer{i}.2.bn2") for i in (1, 2, 3)
    ]
    with torch.no_grad():
        feats = _capture(model, [n for d in layers for n in (d.stage, d.prerelu)],
                         torch.randn(2, 3, 32, 32))
    for d in layers:
        assert (feats[d.prerelu] < 0).any()
        assert (feats[d.stage] >= 0).all()
        assert torch.equal(feats[d.stage], feats[d.prerelu].clamp(min=0))


def test_resnet_uses_parameter_free_shortcuts() -> None:
    model = build_model("resnet20", num_classes=10)
    for name, module in model.named_modules():
        if name.endswith("shortcut"):
            assert not list(module.parameters()), name


def test_pyramidnet_widens_additively() -> None:
    model = build_model("pyramidnet", num_classes=10, depth=20, alpha=48)
    widths = [block.conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3)
              for block in stage]
    assert len(widths) == 9
    assert widths == [round(16 + 48 * (i + 1) / 9) for i in range(9)]
    assert model.fc.in_features == 64
    deep = build_model("pyramidnet", num_classes=10, depth=11, alpha=12, bottleneck=True)
    assert deep.fc.in_features == 4 * 28
    assert [d.prerelu for d in deep.distill_layers()] == ["layer2.0.bn1", "layer3.0.bn1",
                                                          "bn_final"]


def test_list_models_builds_every_name() -> None:
    names = list_models()
    for required in ("wrn16_1", "wrn16_2", "wrn16_4", "wrn28_2", "wrn28_4", "wrn28_10",
                     "wrn40_2", "resnet20", "resnet32", "resnet56", "resnet110",
                     "pyramidnet110", "pyramidnet200"):
        assert required in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("vgg16", {}, "unknown model"),
        ("wrn26_4", {}, "6n+4"),
        ("wrn28_0", {}, "widen factor"),
        ("resnet21", {}, "6n+2"),
        ("pyramidnet", {"depth": 14, "alpha": 48, "bottleneck": True}, "9n+2"),
        ("pyramidnet", {"alpha": 48}, "depth"),
        ("pyramidnet200", {"depth": 110}, "options this model takes"),
        ("wrn28_4", {"depth": 16}, "fixed by the name"),
        ("resnet20", {"dropout": 0.1}, "dropout"),
        ("wrn16_1", {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_config_raises_config_error(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build_model(name, num_classes=10, **kwargs)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("densenet", num_classes=10)
    message = str(info.value)
    assert "wrn28_4" in message and "resnet{depth}" in message and "pyramidnet" in message


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("wrn16_2", {"dropout": 0.2}), ("resnet32", {}), ("pyramidnet110", {}),
     ("pyramidnet", {"depth": 20, "alpha": 48})],
)
def test_rebuild_from_arch_kwargs(name: str, kwargs: dict) -> None:
    model = build_model(name, num_classes=100, in_channels=1, **kwargs)
    stored = json.loads(json.dumps({"arch": model.arch, "kwargs": model.arch_kwargs}))
    assert stored["kwargs"]["num_classes"] == 100 and stored["kwargs"]["in_channels"] == 1
    again = build_model(stored["arch"], **stored["kwargs"])
    assert type(again) is type(model)
    assert count_parameters(again) == count_parameters(model)
    assert again.arch == model.arch and again.arch_kwargs == model.arch_kwargs
    assert again.load_state_dict(model.state_dict()) is not None


def test_name_is_case_insensitive_and_init_is_standard() -> None:
    model = build_model(" WRN16_1 ", num_classes=10)
    assert model.arch == "wrn16_1"
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert torch.all(model.fc.bias == 0)
    conv = model.block3.layer[0].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
