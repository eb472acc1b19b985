"""Feature Shift Tuning: the head penalty's value and gradient, the norm it keeps, and what
the tuning does to a copy of a real (digits) teacher."""

import pytest
import torch
from torch import nn

from robustkd.data import per_class_subset
from robustkd.defenses import DefenseContext, defend_teacher
from robustkd.defenses.fst import FSTSettings, alignment_penalty, keep_norm, reinit_linear
from robustkd.errors import ConfigError
from robustkd.models.layers import (
    classifier_layer,
    held_still,
    layers_of,
    mix_back,
    modules_through,
    reestimate_bn,
)
from robustkd.models.taps import tap


def test_alignment_penalty_golden_value_and_gradient():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    w0 = torch.tensor([[2.0, 1.0], [-4.0, 1.0]])
    # alpha * sum(w * w0) = 0.2 * (2 - 2 - 2 + 3)
    value = alignment_penalty(w, w0, 0.2)
    assert value.item() == pytest.approx(0.2)
    value.backward()
    assert torch.allclose(w.grad, 0.2 * w0)  # descent turns W away from W_orig


def test_keep_norm_restores_the_original_norm():
    layer = nn.Linear(4, 3)
    norm = layer.weight.detach().norm().clone()
    with torch.no_grad():
        layer.weight.mul_(0.1)
    keep_norm(layer, norm)
    assert layer.weight.norm().item() == pytest.approx(norm.item(), rel=1e-6)


def test_reinit_draws_within_the_fan_in_bound_and_is_seeded():
    a, b = nn.Linear(16, 10), nn.Linear(16, 10)
    reinit_linear(a, torch.Generator().manual_seed(3))
    reinit_linear(b, torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight.abs().max() <= 0.25 and a.bias.abs().max() <= 0.25  # 1/sqrt(16)
    assert a.weight.std() > 0.1  # spread over the interval, not left at zero


def test_classifier_layer_is_the_last_linear():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert classifier_layer(model)[0] == "2"
    with pytest.raises(ConfigError, match="no nn.Linear"):
        classifier_layer(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_fst_moves_the_features_of_a_copy_and_turns_its_head_away(digits, digits_teacher):
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    name, head = classifier_layer(digits_teacher)
    w0 = head.weight.detach().clone()
    clean = per_class_subset(digits.train, fraction=0.2, seed=0)
    ctx = DefenseContext(clean=clean, mean=digits.mean, std=digits.std, augment=digits.augment,
                         progress=False, test=digits.test)
    tuned, report = defend_teacher("fst", digits_teacher, ctx, {"epochs": 5, "batch_size": 32})
    for key, value in digits_teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"original teacher {key} changed"
    new = dict(tuned.named_modules())[name].weight.detach()
    assert new.norm().item() == pytest.approx(w0.norm().item(), rel=1e-4)
    cosine = (new * w0).sum() / (new.norm() * w0.norm())
    assert cosine < 0.5, f"the tuned head still reads the old features (cos {cosine:.2f})"
    moved = [k for k, v in tuned.state_dict().items()
             if v.is_floating_point() and "running" not in k and k.rsplit(".", 1)[0] != name
             and not torch.equal(v, before[k])]
    assert len(moved) > 10  # the feature extractor itself was tuned
    assert report["classifier"] == name and len(report["history"]) == 5
    assert report["settings"]["alpha"] == 0.2 and report["settings"]["schedule"] == "cosine"
    # a new head on shifted features still classifies the clean digits
    assert report["cleaned_teacher_metrics"]["acc"] > 0.8


def test_fst_settings_are_checked_where_they_enter(digits, digits_teacher):
    ctx = DefenseContext(clean=per_class_subset(digits.train, fraction=0.1, seed=0),
                         mean=digits.mean, std=digits.std, progress=False)
    for bad in ({"alpha": -0.1}, {"lr": 0.0}, {"schedule": "linear"}, {"tune": "shallow"},
                {"data_fraction": 0.0}, {"data_fraction": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            defend_teacher("fst", digits_teacher, ctx, bad)
    assert FSTSettings().epochs == 10 and FSTSettings().weight_decay == 0.0


def test_fst_on_a_share_of_the_clean_images_tunes_on_that_share_only(digits, digits_teacher):
    ctx = DefenseContext(clean=per_class_subset(digits.train, fraction=0.2, seed=0),
                         mean=digits.mean, std=digits.std, progress=False, seed=3)
    _, report = defend_teacher("fst", digits_teacher, ctx,
                               {"epochs": 1, "batch_size": 32, "data_fraction": 0.5})
    half = per_class_subset(ctx.clean, 0.5, seed=3)
    assert report["images"] == len(half) < len(ctx.clean)
    assert len(half) - 32 < report["history"][0]["images"] <= len(half)
    _, whole = defend_teacher("fst", digits_teacher, ctx, {"epochs": 1, "batch_size": 32})
    assert whole["images"] == len(ctx.clean)


def test_fst_tuning_only_the_deepest_layer_keeps_the_shallower_features(digits, digits_teacher):
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    clean = per_class_subset(digits.train, fraction=0.2, seed=0)
    ctx = DefenseContext(clean=clean, mean=digits.mean, std=digits.std, augment=digits.augment,
                         progress=False)
    tuned, report = defend_teacher("fst", digits_teacher, ctx,
                                   {"epochs": 2, "batch_size": 32, "tune": "deepest"})
    layers = layers_of(digits_teacher)
    held = report["held"]
    assert held[-1] == layers[-2].prerelu and "conv1" in held
    assert not any(name.startswith(layers[-1].stage) and name != layers[-2].prerelu
                   for name in held)  # the deepest stage itself tunes
    state = tuned.state_dict()
    for key, value in state.items():
        owner = key.rsplit(".", 1)[0]
        if owner in held:  # weights and BN statistics both
            assert torch.equal(value, before[key]), f"held {key} moved"
    moved = [k for k in state if k.rsplit(".", 1)[0] not in held and state[k].is_floating_point()
             and not torch.equal(state[k], before[k])]
    assert any(k.startswith(layers[-1].stage) for k in moved)
    # the shallower distillation features are the original's, the deepest are not
    x = next(iter(ctx.loader(16)))[0]
    names = [layer.prerelu for layer in layers]
    tuned.eval()
    digits_teacher.eval()
    with tap(tuned, names, detach=True) as a, torch.no_grad():
        tuned(x)
    with tap(digits_teacher, names, detach=True) as b, torch.no_grad():
        digits_teacher(x)
    for name in names[:-1]:
        assert torch.equal(a[name], b[name])
    assert not torch.allclose(a[names[-1]], b[names[-1]])
    assert all(p.requires_grad for p in tuned.parameters())  # gradients given back


def test_modules_through_follows_the_forward_pass_not_the_code_order():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 4)  # declared first, runs last
            self.early = nn.Linear(4, 4)
            self.mid = nn.BatchNorm1d(4)
            self.act = nn.ReLU()  # no weights: not listed

        def forward(self, x):
            return self.late(self.act(self.mid(self.early(x))))

    model = Branchy()
    assert modules_through(model, "mid", torch.randn(2, 4)) == ["early", "mid"]
    assert modules_through(model, "act", torch.randn(2, 4)) == ["early", "mid", "act"]
    with pytest.raises(KeyError, match="no module named"):
        modules_through(model, "nope", torch.randn(2, 4))


def test_held_still_keeps_weights_and_bn_statistics_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with held_still([model[0], model[1]]):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 3)).sum().backward()
            opt.step()
    after = model.state_dict()
    for key in ("0.weight", "1.weight", "1.running_mean", "1.running_var",
                "1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert model[1].momentum == 0.1 and model[0].weight.requires_grad


def test_mix_back_averages_weights_and_bn_statistics_but_not_the_skipped_head():
    torch.manual_seed(0)
    tuned = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    original = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        original[1].running_mean.fill_(2.0)
        original[1].running_var.fill_(3.0)
        original[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    kept = {k: v.clone() for k, v in original.state_dict().items()}
    mixed = mix_back(tuned, original, 0.25, skip=["2"])
    state = tuned.state_dict()
    # 0.25 * original + 0.75 * tuned, by hand for two entries
    assert torch.allclose(state["0.weight"], 0.25 * kept["0.weight"] + 0.75 * before["0.weight"])
    assert torch.allclose(state["1.running_mean"], torch.full((4,), 0.5))  # 0.25 * 2 + 0.75 * 0
    assert torch.allclose(state["1.running_var"], torch.full((4,), 1.5))  # 0.25 * 3 + 0.75 * 1
    assert int(state["1.num_batches_tracked"]) == 0  # a count, not averaged
    assert torch.equal(state["2.weight"], before["2.weight"])  # the skipped head stays tuned
    assert "2.weight" not in mixed and "0.bias" in mixed
    for key, value in original.state_dict().items():
        assert torch.equal(value, kept[key]), f"original {key} changed"
    with pytest.raises(ConfigError, match="keep must be in"):
        mix_back(tuned, original, 1.5)
    with pytest.raises(ConfigError, match="keys differ"):
        mix_back(tuned, nn.Sequential(nn.Linear(3, 4)), 0.5)


def test_reestimate_bn_sets_the_plain_average_of_the_batches_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.eval()
    batches = [torch.randn(8, 3) * (i + 1) for i in range(3)]
    with torch.no_grad():
        pre = [model[0](x) for x in batches]
    assert reestimate_bn(model, iter(batches)) == 1
    bn = model[1]
    mean = torch.stack([p.mean(0) for p in pre]).mean(0)
    var = torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # its settings and mode restored
    with pytest.raises(ConfigError, match="at least one batch"):
        reestimate_bn(model, iter([]))


def test_fst_original_share_averages_the_tuned_copy_with_the_original(digits, digits_teacher):
    clean = per_class_subset(digits.train, fraction=0.1, seed=0)
    ctx = DefenseContext(clean=clean, mean=digits.mean, std=digits.std, augment=digits.augment,
                         progress=False)
    settings = {"epochs": 1, "batch_size": 32}
    plain, _ = defend_teacher("fst", digits_teacher, ctx, settings)
    half, report = defend_teacher("fst", digits_teacher, ctx, {**settings, "original_share": 0.5})
    whole, _ = defend_teacher("fst", digits_teacher, ctx, {**settings, "original_share": 1.0})
    head = classifier_layer(digits_teacher)[0]
    assert report["settings"]["original_share"] == 0.5
    a, b, o, w = (m.state_dict() for m in (plain, half, digits_teacher, whole))
    params = {k for k, _ in digits_teacher.named_parameters()}
    features = [k for k in params if not k.startswith(f"{head}.")]
    assert any(not torch.equal(a[k], o[k]) for k in features)  # the tuning moved them
    for key in features:
        assert torch.allclose(b[key], 0.5 * (a[key] + o[key]), atol=1e-6), key
        assert torch.equal(w[key], o[key]), key  # share 1: the original's features
    # BN statistics are measured again on the mixed network, not averaged
    stats = [k for k in o if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(b[k], 0.5 * (a[k] + o[k]), atol=1e-4) for k in stats)
    # measured on the original's own weights they land near its own statistics
    for key in stats:
        spread = o[key.replace("running_mean", "running_var")].sqrt()
        assert ((w[key] - o[key]).abs() <= 0.5 * spread + 0.05).float().mean() > 0.9, key
    for key in (f"{head}.weight", f"{head}.bias"):  # the head is FST's, whatever the share
        assert torch.equal(b[key], a[key]) and torch.equal(w[key], a[key])
    with pytest.raises(ConfigError, match="original_share"):
        defend_teacher("fst", digits_teacher, ctx, {"original_share": 1.5})
