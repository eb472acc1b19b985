import pytest
import torch

from robustkd.attacks import get_attack
from robustkd.attacks.clean_label import with_clean_label
from robustkd.attacks.poison import poison_target_class
from robustkd.attacks.registry import AttackContext
from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError
from robustkd.triggers import blend_trigger


def _data() -> ImageDataset:
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    images = torch.randint(0, 256, (30, 3, 4, 4), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return ImageDataset(images, labels, ["a", "b", "c"])


def test_clean_label_blended_triggers_only_target_images_and_keeps_labels():
    ds = _data()
    spec = get_attack("blended-clean-label")
    ctx = AttackContext(None, None, settings=spec.make_settings({"alpha": 0.5}))
    trig = blend_trigger((4, 4), 3, alpha=0.5, pattern="noise", seed=0)
    out = spec.build_poison(ctx, trig, ds, target=1, ratio=0.6, seed=3)
    assert len(out) == len(ds) and torch.equal(out.labels, ds.labels)
    changed = (out.images != ds.images).flatten(1).any(1)
    assert torch.equal(changed, out.is_poison)
    assert int(changed.sum()) == 6 and bool((ds.labels[changed] == 1).all())
    assert torch.equal(out.images[changed], trig.apply_uint8(ds.images[changed]))
    again = spec.build_poison(ctx, trig, ds, target=1, ratio=0.6, seed=3)
    assert torch.equal(again.images, out.images)  # the choice is seeded


def test_the_variant_keeps_the_base_trigger_and_settings():
    base, variant = get_attack("badnets"), get_attack("badnets-clean-label")
    assert variant.build_trigger is base.build_trigger and variant.settings is base.settings
    assert variant.build_poison is not base.build_poison


def test_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="poisons its own way"):
        with_clean_label("sig")
    with pytest.raises(ConfigError, match="class 2 has none"):
        two_classes = ImageDataset(_data().images[:20], _data().labels[:20], ["a", "b", "c"])
        poison_target_class(two_classes, blend_trigger((4, 4), 3, alpha=0.5, seed=0), 2, 0.5)
    with pytest.raises(ConfigError, match="--poison-ratio"):
        poison_target_class(_data(), blend_trigger((4, 4), 3, alpha=0.5, seed=0), 0, 1.5)
