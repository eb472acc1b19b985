"""Feature taps on a model that is not in the registry."""

import pytest
import torch
from torch import nn

from robustkd.models.taps import PersistentTap, tap


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_capture_matches_manual_forward():
    torch.manual_seed(0)
    model, x = Custom(), torch.randn(2, 3, 8, 8)
    with tap(model, ["stem", "body.1"]) as t:
        model(x)
    assert torch.allclose(t["stem"], model.stem(x))
    assert torch.allclose(t["body.1"], model.body(model.stem(x)))


def test_replacement_changes_downstream_and_is_removed_afterwards():
    torch.manual_seed(0)
    model, x = Custom(), torch.randn(2, 3, 8, 8)
    plain = model(x)
    with tap(model, ["stem"], replace={"stem": torch.zeros_like}) as t:
        replaced = model(x)
    expected = model.head(model.body(torch.zeros(2, 4, 8, 8)).mean((2, 3)))
    assert torch.allclose(replaced, expected)
    assert torch.equal(t["stem"], torch.zeros(2, 4, 8, 8))
    assert torch.allclose(model(x), plain)  # hooks gone
    assert not model.stem._forward_hooks


def test_hooks_removed_when_body_raises():
    model = Custom()
    with pytest.raises(RuntimeError), tap(model, ["stem"], replace={"body": lambda f: f}):
        raise RuntimeError("boom")
    assert not model.stem._forward_hooks and not model.body._forward_hooks


def test_gradient_flows_through_replacement():
    model, x = Custom(), torch.randn(2, 3, 8, 8)
    scale = torch.ones(1, requires_grad=True)
    with tap(model, replace={"stem": lambda f: f * scale}):
        model(x).sum().backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_unknown_module_and_shape_change_are_clear_errors():
    model = Custom()
    with pytest.raises(KeyError, match="no module named 'stem2'"), tap(model, ["stem2"]):
        pass
    with pytest.raises(ValueError, match="changed the shape"), tap(
        model, replace={"stem": lambda f: f[:, :2]}
    ):
        model(torch.randn(1, 3, 8, 8))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_persistent_tap_hooks_once_and_acts_only_while_recording():
    torch.manual_seed(0)
    model, x = Custom(), torch.randn(2, 3, 8, 8)
    plain = model(x)
    taps = PersistentTap(model, ["stem"], replace={"body.1": lambda f: 0 * f})
    assert _hooks(model) == 2
    assert torch.equal(model(x), plain), "outside recording() the hooks do nothing"
    for _ in range(3):  # every step reuses the same hooks
        with taps.recording() as t:
            out = model(x)
        assert _hooks(model) == 2
        assert torch.allclose(t["stem"], model.stem(x))
        assert torch.allclose(out, model.head.bias.expand(2, 2))  # body zeroed
    with taps.recording() as t:
        assert "stem" not in t, "each recording starts empty"
    taps.close()
    assert _hooks(model) == 0 and torch.equal(model(x), plain)
