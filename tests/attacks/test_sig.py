"""SIG: the sinusoidal signal, its additive trigger (saved and reloaded), clean-label poison."""

from __future__ import annotations

import math

import pytest
import torch

from robustkd import api
from robustkd.attacks.registry import AttackContext
from robustkd.attacks.sig import sig_poison, sinusoid
from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError
from robustkd.triggers import AdditiveTrigger, Trigger


def test_sinusoid_matches_the_formula_and_is_constant_down_columns():
    v = sinusoid((4, 12), 3, delta=40.0, frequency=6.0)
    assert v.shape == (3, 4, 12)
    for j in range(12):
        assert v[1, 2, j].item() == pytest.approx(40 / 255 * math.sin(2 * math.pi * j * 6 / 12),
                                                  abs=1e-6)
    assert torch.equal(v[:, 0], v[:, 3]) and torch.equal(v[0], v[2])
    with pytest.raises(ConfigError, match="--sig-delta"):
        sinusoid((4, 4), 1, delta=0.0, frequency=6.0)


def test_additive_trigger_adds_clips_and_survives_saving():
    signal = torch.tensor([[[0.5, -0.5]]])
    trig = AdditiveTrigger(signal, kind="sig", params={"delta": 1})
    x = torch.tensor([[[[0.7, 0.2]]]])
    assert torch.allclose(trig.apply(x), torch.tensor([[[[1.0, 0.0]]]]))
    again = Trigger.from_saved(trig.config(), trig.tensors())
    assert isinstance(again, AdditiveTrigger) and torch.equal(again.apply(x), trig.apply(x))


def test_sig_poisons_only_target_images_and_keeps_every_label():
    labels = torch.tensor([0] * 10 + [1] * 10)
    ds = ImageDataset(torch.full((20, 1, 2, 4), 100, dtype=torch.uint8), labels, ["a", "b"])
    trig = AdditiveTrigger(torch.full((1, 2, 4), 0.2))
    out = sig_poison(AttackContext(None, None), trig, ds, target=0, ratio=0.5, seed=1)
    assert len(out) == len(ds) and torch.equal(out.labels, labels)
    changed = (out.images != ds.images).flatten(1).any(1)
    assert torch.equal(changed, out.is_poison)
    assert int(changed.sum()) == 5 and bool((labels[changed] == 0).all())
    assert int(out.images[changed].max()) == 100 + 51  # 0.2 * 255 added, quantised


def test_sig_from_scratch_records_asr_that_a_reload_reproduces(tmp_path):
    rec = api.attack(attack="sig", model="wrn10_1", dataset="digits", epochs=2,
                     poison_ratio=1.0, lr=0.05, out=tmp_path / "sig", device="cpu",
                     progress=False)
    again = api.evaluate(run=tmp_path / "sig", device="cpu")
    assert again["metrics"]["asr"] == pytest.approx(rec["metrics"]["asr"])
    assert rec["trigger"]["kind"] == "sig" and rec["trigger"]["placement"] == "additive"
