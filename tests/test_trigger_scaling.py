"""Triggers specified for 32x32 images scale with larger images (64, 224 px)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustkd.errors import ConfigError
from robustkd.triggers import (
    Trigger,
    blend_trigger,
    patch_trigger,
    random_patch_trigger,
    rescale_trigger,
    trigger_scale,
)


def test_scale_rule():
    assert trigger_scale((32, 32)) == 1.0
    assert trigger_scale((16, 16)) == 1.0  # smaller images keep the given lengths
    assert trigger_scale((64, 64)) == 2.0
    assert trigger_scale((224, 300)) == 7.0  # the shorter side decides
    assert trigger_scale((224, 224), None) == 1.0
    with pytest.raises(ConfigError, match="reference_size"):
        trigger_scale((64, 64), 0)


@pytest.mark.parametrize("size", [(16, 16), (32, 32)])
def test_small_images_are_unchanged(size):
    for pos in ("br", "tl", "center", (2, 3)):
        a = patch_trigger(size, 3, size=3, position=pos)
        b = patch_trigger(size, 3, size=3, position=pos, reference_size=None)
        assert torch.equal(a.pattern, b.pattern) and torch.equal(a.mask, b.mask)
        assert a.params == b.params
    a, b = blend_trigger(size, 3, seed=4), blend_trigger(size, 3, seed=4, reference_size=None)
    assert torch.equal(a.pattern, b.pattern) and a.params == b.params


@pytest.mark.parametrize(("side", "factor"), [(64, 2), (96, 3), (224, 7)])
def test_patch_grows_with_the_image(side, factor):
    small = patch_trigger((32, 32), 3, size=3, position="br", margin=1)
    big = patch_trigger((side, side), 3, size=3, position="br", margin=1)
    s = 3 * factor
    assert big.params["side"] == s and big.params["size"] == 3
    assert big.params["position"] == [side - s - factor] * 2  # margin 1 -> factor px
    # the same fraction of the image is covered
    assert big.mask.sum() / side**2 == pytest.approx(float(small.mask.sum()) / 32**2)
    # checkerboard cells grow (nearest-neighbour), they do not become a 1 px grid
    r, c = big.params["position"]
    tile = big.pattern[:, r:r + s, c:c + s]
    r0, c0 = small.params["position"]
    expected = small.pattern[:, r0:r0 + 3, c0:c0 + 3].repeat_interleave(factor, 1)
    assert torch.equal(tile, expected.repeat_interleave(factor, 2))
    # the big trigger is the small one upsampled (nearest)
    assert torch.equal(rescale_trigger(small, (side, side)).mask, big.mask)
    assert torch.equal(rescale_trigger(small, (side, side)).pattern, big.pattern)


def test_patch_positions_and_tensor_tiles_scale_too():
    t = patch_trigger((64, 96), 3, size=2, position=(4, 5))
    assert t.params["position"] == [8, 10] and t.params["side"] == 4
    assert t.mask[0, 8:12, 10:14].eq(1).all() and t.mask.sum() == 16
    tile = torch.rand(3, 3, 3)
    t = patch_trigger((64, 64), 3, size=3, pattern=tile, position="tl")
    assert torch.equal(t.pattern[:, 2:8, 2:8],
                       tile.repeat_interleave(2, 1).repeat_interleave(2, 2))
    with pytest.raises(ConfigError, match=r"expected \[C, 3, 3\]"):
        patch_trigger((64, 64), 3, size=3, pattern=torch.rand(3, 6, 6))
    with pytest.raises(ConfigError, match="leaves the 64x64 image"):
        patch_trigger((64, 64), 3, size=3, position=(30, 0))  # (60, 0) at 64 px
    # without scaling a 3 px patch stays 3 px on any image
    assert patch_trigger((224, 224), 3, reference_size=None).mask.sum() == 9


def test_blend_pattern_is_the_32px_pattern_resized_bilinearly():
    small = blend_trigger((32, 32), 3, alpha=0.1, seed=7)
    for side in (64, 224):
        big = blend_trigger((side, side), 3, alpha=0.1, seed=7)
        up = F.interpolate(small.pattern[None], size=(side, side), mode="bilinear",
                           align_corners=False)[0]
        assert torch.allclose(big.pattern, up)
        assert big.mask.shape == (1, side, side) and torch.allclose(big.mask, torch.tensor(0.1))
        assert big.params["reference_size"] == 32
        assert torch.allclose(rescale_trigger(small, (side, side)).pattern, big.pattern,
                              atol=1e-6)
    # natively drawn noise at 224 px would be pixel-level; the scaled one is smooth
    native = blend_trigger((224, 224), 3, seed=7, reference_size=None).pattern
    scaled = blend_trigger((224, 224), 3, seed=7).pattern
    roughness = [(p[..., 1:] - p[..., :-1]).abs().mean() for p in (native, scaled)]
    assert roughness[1] < roughness[0] / 4
    stripes = blend_trigger((128, 128), 1, pattern="stripes").pattern
    assert stripes[0, 0, :4].max() > 0.99 and stripes[0, 0, 10:14].min() < 0.01  # period 16
    image = torch.rand(3, 40, 40)
    assert blend_trigger((80, 80), 3, pattern=image).pattern.shape == (3, 80, 80)


def test_scaled_triggers_apply_to_their_images():
    x = torch.rand(4, 3, 64, 64)
    for trig in (patch_trigger((64, 64), 3), blend_trigger((64, 64), 3)):
        y = trig.apply(x)
        assert y.shape == x.shape and (y - x).abs().sum() > 0
    with pytest.raises(ConfigError, match="for 64x64 images"):
        patch_trigger((64, 64), 3).apply(torch.rand(1, 3, 32, 32))


def test_rescale_learned_and_refuse_moving_triggers():
    learned = Trigger(torch.rand(3, 32, 32), torch.rand(1, 32, 32) * 0.2, kind="ckd")
    big = rescale_trigger(learned, (64, 64))
    assert big.kind == "ckd" and big.image_size == (64, 64)
    assert big.params["rescaled_from"] == [32, 32]
    assert float(big.mask.min()) >= 0 and float(big.mask.max()) <= 0.2 + 1e-6
    small = rescale_trigger(learned, (16, 16))  # antialiased when shrinking
    assert torch.allclose(small.mask.mean(), learned.mask.mean(), atol=1e-3)
    assert rescale_trigger(learned, (32, 32)) is learned

    class Moving(Trigger):
        placement = "random"

    with pytest.raises(ConfigError, match="rebuild it"):
        rescale_trigger(Moving(torch.rand(3, 3, 3), torch.ones(1, 3, 3), kind="htba"), (64, 64))


def test_random_patch_grows_with_the_image_and_keeps_its_cells():
    small = random_patch_trigger((32, 32), 3, size=3, seed=1)
    big = random_patch_trigger((224, 224), 3, size=3, seed=1)
    assert small.patch_size == 3 and "requested_size" not in small.params
    assert big.patch_size == 21 and big.params["requested_size"] == 3
    # nearest-neighbour enlargement: every 7x7 block of the big tile is one small-tile pixel
    assert torch.equal(big.pattern[:, ::7, ::7], small.pattern)
    x = torch.zeros(4, 3, 224, 224)
    changed = (big.apply(x) != x).any(1).flatten(1).sum(1)
    assert (changed <= 21 * 21).all() and (changed > 0).all()
    with pytest.raises(ConfigError, match="does not fit"):
        random_patch_trigger((16, 16), 3, size=17)
