import pytest
import torch

from robustkd.attacks import get_attack
from robustkd.attacks.graded import GradedTrigger
from robustkd.attacks.registry import AttackContext
from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError
from robustkd.triggers import AdditiveTrigger, blend_trigger


def _data(n: int = 40) -> ImageDataset:
    labels = torch.arange(4).repeat_interleave(n // 4)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return ImageDataset(images, labels, ["a", "b", "c", "d"])


def _strength(clean: torch.Tensor, poisoned: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Per-image least-squares s in poisoned = clean + s * (full - clean)."""
    d = (full.float() - clean.float()).flatten(1)
    return ((poisoned.float() - clean.float()).flatten(1) * d).sum(1) / (d * d).sum(1)


def test_graded_poison_spreads_strengths_between_the_minimum_and_full():
    ds = _data()
    spec = get_attack("blended-graded")
    settings = spec.make_settings({"alpha": 0.5, "strength_min": 0.4})
    trig = blend_trigger((8, 8), 3, alpha=0.5, pattern="noise", seed=0)
    out = spec.build_poison(AttackContext(None, None, settings=settings), trig, ds, target=0,
                            ratio=1.0, seed=1)
    # poison-label as the base: 30 non-target copies appended, relabelled to the target
    assert len(out) == len(ds) + 30 and bool((out.labels[len(ds):] == 0).all())
    index = torch.nonzero(ds.labels != 0).flatten()
    s = _strength(ds.images[index], out.images[len(ds):], trig.apply_uint8(ds.images[index]))
    assert float(s.min()) > 0.4 - 0.03 and float(s.max()) < 1.0 + 0.03
    assert float(s.max() - s.min()) > 0.3  # spread, not one strength
    again = spec.build_poison(AttackContext(None, None, settings=settings), trig, ds, target=0,
                              ratio=1.0, seed=1)
    assert torch.equal(again.images, out.images)  # seeded


def test_strength_one_is_the_base_attack():
    ds = _data()
    base, graded = get_attack("blended"), get_attack("blended-graded")
    trig = blend_trigger((8, 8), 3, alpha=0.3, pattern="stripes", seed=0)
    ctx = AttackContext(None, None, settings=graded.make_settings({"strength_min": 1.0}))
    out = graded.build_poison(ctx, trig, ds, target=2, ratio=0.5, seed=0)
    ref = base.build_poison(AttackContext(None, None, settings=base.make_settings({})), trig, ds,
                            target=2, ratio=0.5, seed=0)
    assert torch.equal(out.images, ref.images) and torch.equal(out.labels, ref.labels)
    assert graded.build_trigger is base.build_trigger


def test_sig_graded_stays_clean_label():
    ds = _data()
    spec = get_attack("sig-graded")
    signal = torch.full((3, 8, 8), 0.2)
    trig = AdditiveTrigger(signal)
    ctx = AttackContext(None, None, settings=spec.make_settings({"strength_min": 0.5}))
    out = spec.build_poison(ctx, trig, ds, target=1, ratio=1.0, seed=0)
    assert torch.equal(out.labels, ds.labels)
    changed = out.is_poison
    assert bool((ds.labels[changed] == 1).all()) and int(changed.sum()) == 10
    s = _strength(ds.images[changed], out.images[changed], trig.apply_uint8(ds.images[changed]))
    assert float(s.min()) > 0.5 - 0.05 and float(s.max()) < 1.0 + 0.05


def test_graded_trigger_keeps_the_base_trigger_for_testing():
    base = blend_trigger((8, 8), 3, alpha=0.5, pattern="noise", seed=0)
    g = GradedTrigger(base, 0.25, seed=0)
    assert g.kind.endswith("-graded") and g.params["strength_min"] == 0.25
    s = g.strengths(1000)
    assert float(s.min()) >= 0.25 and float(s.max()) <= 1.0 and abs(float(s.mean()) - 0.625) < 0.03


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_strength_min_is_validated_with_its_flag(value):
    with pytest.raises(ConfigError, match="strength-min|strength_min"):
        get_attack("sig-graded").make_settings({"strength_min": value})


def test_graded_attack_runs_and_saves_the_full_strength_trigger(tmp_path):
    from robustkd import api
    from robustkd.runs import load_run

    rec = api.attack(attack="blended-graded", model="wrn10_1", dataset="digits", epochs=1,
                     options={"alpha": 0.3, "blend_pattern": "stripes", "strength_min": 0.3},
                     lr=0.05, out=tmp_path / "g", device="cpu", progress=False)
    assert rec["config"]["options"]["strength_min"] == 0.3
    run = load_run(tmp_path / "g", "cpu")
    ref = blend_trigger(run.trigger.image_size, 1, alpha=0.3, pattern="stripes", seed=0)
    assert run.trigger.kind == ref.kind and torch.allclose(run.trigger.mask, ref.mask)
    assert "strength_min" not in run.trigger.params  # the test trigger is the base one
