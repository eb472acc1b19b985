"""RobustKD detoxification masks: mixing formulas, projection, objective, training."""

import pytest
import torch

from robustkd.defenses.detox import (
    DetoxMasks,
    detox_loss,
    train_detox_masks,
)
from robustkd.defenses.robustkd import RobustKDConfig
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import accuracy, per_example_variance
from robustkd.models.taps import tap
from robustkd.training.loop_settings import LoopSettings


def test_eq7_and_eq15_mix_by_hand():
    delta = torch.full((2, 1, 1), 4.0)
    f = torch.ones(1, 2, 1, 1)
    eq7 = DetoxMasks(["a"], [delta], tau=0.5, variant="eq7", mask_init=0.25)
    assert torch.allclose(eq7.mix(0, f), torch.full_like(f, 0.75 * 1 + 0.25 * 4))
    eq15 = DetoxMasks(["a"], [delta], tau=0.5, variant="eq15", mask_init=0.25)
    assert torch.allclose(eq15.mix(0, f), torch.full_like(f, 1 + 0.25 * 4))
    with pytest.raises(ConfigError):
        DetoxMasks(["a"], [delta], tau=0.5, variant="eq8")


def test_projection_clamps_into_zero_tau():
    masks = DetoxMasks(["a"], [torch.zeros(3, 2, 2)], tau=0.1)
    assert torch.allclose(masks.masks[0], torch.full((3, 2, 2), 0.05))
    with torch.no_grad():
        masks.masks[0].copy_(torch.tensor([-1.0, 0.05, 2.0]).view(3, 1, 1).expand(3, 2, 2))
    masks.project_()
    assert masks.masks[0][:, 0, 0].tolist() == pytest.approx([0.0, 0.05, 0.1])


def test_save_and_reload_round_trip():
    masks = DetoxMasks(["x", "y"], [torch.randn(2, 3, 3), torch.randn(4, 1, 1)], tau=0.3)
    back = DetoxMasks.from_saved(masks.config(), masks.tensors())
    f = torch.randn(5, 2, 3, 3)
    assert torch.allclose(back.mix(0, f), masks.mix(0, f))
    assert back.names == ["x", "y"] and back.tau == 0.3


def test_detox_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    feat = torch.tensor([[[[1.0, 3.0]]]])  # one example, variance (unbiased) of [1, 3] = 2
    ce = -torch.log_softmax(logits, 1)[0, 0].item()
    assert per_example_variance(feat).tolist() == [2.0]
    assert detox_loss(logits, y, feat, "ce+var", lam=0.5).item() == pytest.approx(ce + 1.0)
    assert detox_loss(logits, y, feat, "ce").item() == pytest.approx(ce)
    assert detox_loss(logits, y, feat, "var", lam=2.0).item() == pytest.approx(4.0)


def test_training_masks_lowers_variance_and_keeps_teacher(digits, digits_teacher):
    names = [layer.stage for layer in digits_teacher.distill_layers()]
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    clean = digits.train.subset(torch.arange(0, len(digits.train), 3))
    masks, history = train_detox_masks(
        digits_teacher, clean, names,
        RobustKDConfig(loss="var", detox_epochs=3, detox_lr=0.02).detox(0.5),
        LoopSettings(mean=digits.mean, std=digits.std, progress=False))
    assert history[-1].stats["variance"] < 0.8 * history[0].stats["variance"]
    assert all(float(m.detach().max()) <= 0.5 + 1e-6 and float(m.detach().min()) >= 0
               for m in masks.masks)
    for k, v in digits_teacher.state_dict().items():
        assert torch.equal(v, before[k])
    plain = accuracy(digits_teacher, digits.test, digits.mean, digits.std)
    with tap(digits_teacher, replace=masks.replacements()):
        detoxed = accuracy(digits_teacher, digits.test, digits.mean, digits.std)
    assert detoxed != plain  # the masks act inside the forward pass
