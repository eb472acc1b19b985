"""Triggers, poisoning and ASR bookkeeping on hand-checkable tensors."""

import pytest
import torch

from robustkd.attacks import (
    Trigger,
    blend_trigger,
    patch_trigger,
    poison_dataset,
    select_poison_indices,
    triggered_test_set,
)
from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import attack_success_rate


def _ds(n_per_class=10, classes=3, size=8):
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.full((len(labels), 3, size, size), 100, dtype=torch.uint8)
    return ImageDataset(images, labels, [str(c) for c in range(classes)])


def test_patch_writes_checkerboard_in_bottom_right_only():
    trig = patch_trigger((8, 8), 3, size=3, position="br", margin=1)
    x = torch.full((2, 3, 8, 8), 0.5)
    out = trig.apply(x)
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.equal(out[0, 1, 4:7, 4:7], expected)
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[4:7, 4:7] = False
    assert torch.equal(out[:, :, untouched], x[:, :, untouched])


def test_blend_is_convex_mix():
    trig = blend_trigger((4, 4), 3, alpha=0.2, pattern=torch.ones(3, 4, 4))
    x = torch.zeros(1, 3, 4, 4)
    assert torch.allclose(trig.apply(x), torch.full_like(x, 0.2))


def test_trigger_rejects_wrong_size_and_bad_parameters():
    trig = patch_trigger((8, 8), 3)
    with pytest.raises(ConfigError, match="8x8 images"):
        trig.apply(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError):
        patch_trigger((8, 8), 3, size=9)
    with pytest.raises(ConfigError):
        blend_trigger((8, 8), 3, alpha=0.0)


def test_trigger_serialisation_round_trip():
    trig = blend_trigger((6, 6), 3, alpha=0.1, seed=3)
    back = Trigger.from_saved(trig.config(), trig.tensors())
    x = torch.rand(2, 3, 6, 6)
    assert torch.equal(back.apply(x), trig.apply(x))
    assert back.kind == "blend" and back.params["alpha"] == 0.1


def test_poison_selects_ratio_of_each_non_target_class():
    ds = _ds(n_per_class=20, classes=4)
    idx = select_poison_indices(ds.labels, target=1, ratio=0.1, seed=0)
    counts = torch.bincount(ds.labels[idx], minlength=4)
    assert counts.tolist() == [2, 0, 2, 2]
    assert torch.equal(idx, select_poison_indices(ds.labels, 1, 0.1, seed=0))


def test_poison_keeps_originals_and_relabels_copies():
    ds = _ds()
    trig = patch_trigger((8, 8), 3, size=2)
    out = poison_dataset(ds, trig, target=0, ratio=0.2, keep_originals=True)
    assert len(out) == len(ds) + 4  # 2 from each of classes 1 and 2
    assert torch.equal(out.images[: len(ds)], ds.images)
    assert (out.labels[len(ds):] == 0).all() and out.is_poison[len(ds):].all()
    assert not out.is_poison[: len(ds)].any()
    assert (out.images[len(ds):, :, 5:7, 5:7] != 100).any()

    replaced = poison_dataset(ds, trig, target=0, ratio=0.2, keep_originals=False)
    assert len(replaced) == len(ds) and int(replaced.is_poison.sum()) == 4
    assert (replaced.labels[replaced.is_poison] == 0).all()


def test_triggered_test_set_excludes_target_class():
    ds = _ds(n_per_class=5, classes=3)
    trig = patch_trigger((8, 8), 3, size=2)
    out = triggered_test_set(ds, trig, target=2)
    assert len(out) == 10 and (out.labels != 2).all()


class _PatchDetector(torch.nn.Module):
    """Predicts class 0 iff the bottom-right pixel is bright, else class 1 (a 'backdoor')."""

    def forward(self, x):
        bright = (x[:, 0, -2, -2] > 0).float()
        return torch.stack([bright, 1 - bright], dim=1)


def test_asr_counts_only_non_target_images():
    ds = _ds(n_per_class=5, classes=3)
    ds.images[:] = 0
    trig = patch_trigger((8, 8), 3, size=1, pattern="white")  # lights pixel (-2, -2)
    asr = attack_success_rate(_PatchDetector(), ds, trig, target=0, mean=(0.5,) * 3,
                              std=(0.5,) * 3)
    assert asr == 1.0
    # With target 1, triggered images all go to class 0: no success at all, and the five
    # class-1 images (which a naive ASR would count) are excluded.
    assert attack_success_rate(_PatchDetector(), ds, trig, target=1, mean=(0.5,) * 3,
                               std=(0.5,) * 3) == 0.0


def test_badnets_margin_setting_moves_the_patch_to_the_border():
    from robustkd.attacks import AttackContext, get_attack
    from robustkd.data.dataset import DatasetSplits

    spec = get_attack("badnets")
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    ds = ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a"])
    splits = DatasetSplits(ds, ds, "tiny", (0.5,), (0.5,))
    for margin in (0, 2):
        settings = spec.make_settings({"patch_margin": margin, "patch_pattern": "white"})
        trig = spec.build_trigger(AttackContext(splits, None, settings))
        mask = trig.mask[0] > 0
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert int(rows.max()) == 7 - margin and int(cols.max()) == 7 - margin
