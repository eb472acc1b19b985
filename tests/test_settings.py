"""Settings dataclasses: defaults in one place, checked where they enter."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from robustkd.errors import ConfigError
from robustkd.settings import (
    add_entry_flags,
    entry_options,
    flag_name,
    make_settings,
    setting,
    settings_dict,
)


@dataclass(frozen=True)
class Small:
    size: int = setting(3, "patch side", minimum=1)
    alpha: float = setting(0.15, "blend weight", above=0.0, maximum=1.0)
    layers: tuple[str, ...] | None = setting(None, "module names")
    kind: str = setting("noise", "pattern", choices=("noise", "stripes"))
    eot: bool = setting(True, "augment while crafting")


@dataclass(frozen=True)
class Other:
    size: int = setting(5, "patch side", minimum=1)


def test_defaults_fill_in_and_values_are_converted():
    s = make_settings(Small, {"size": "4", "layers": "a, b", "eot": "false"}, "attack x")
    assert (s.size, s.alpha, s.layers, s.eot) == (4, 0.15, ("a", "b"), False)
    assert settings_dict(s)["layers"] == ["a", "b"]  # JSON-ready
    assert make_settings(Small, {"alpha": None}, "x").alpha == 0.15  # None: not given


@pytest.mark.parametrize("options, message", [
    ({"sise": 2}, "no setting 'sise' (did you mean 'size'?)"),
    ({"size": 0}, "size must be >= 1, got 0"),
    ({"alpha": 0.0}, "alpha must be > 0.0, got 0.0"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"kind": "plaid"}, "kind must be one of ['noise', 'stripes']"),
    ({"size": 2.5}, "size must be a int, got 2.5"),
    ({"eot": "maybe"}, "eot must be a bool"),
])
def test_bad_values_are_refused_with_the_setting_named(options, message):
    with pytest.raises(ConfigError, match="attack x") as err:
        make_settings(Small, options, "attack x")
    assert message in str(err.value)


def test_entry_flags_are_prefixed_and_only_given_ones_count():
    parser = argparse.ArgumentParser()
    dests = add_entry_flags(parser, {"a": Small, "b": Other}, choose="--attack")
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["a_size"] == "patch side (default 3)" and helps["b_size"].endswith("(default 5)")
    assert helps["a_layers"] == "module names (default: not set)"
    args = parser.parse_args(["--b-size", "7"])
    assert entry_options(args, dests, "b", choose="--attack") == {"size": 7}
    assert entry_options(parser.parse_args([]), dests, "b", choose="--attack") == {}
    args = parser.parse_args(["--a-alpha", "0.3"])
    with pytest.raises(ConfigError, match="--a-alpha applies to --attack a, not b"):
        entry_options(args, dests, "b", choose="--attack")
    with pytest.raises(SystemExit):  # choices are enforced by the parser too
        parser.parse_args(["--a-kind", "plaid"])


def test_a_setting_named_after_its_entry_is_not_doubled():
    assert flag_name("htba", "htba_eps") == "--htba-eps"
    assert flag_name("adaptive-ckd", "mask_max") == "--adaptive-ckd-mask-max"


def test_a_mutable_default_is_a_programming_error():
    with pytest.raises(TypeError):
        setting([1], "no lists")
