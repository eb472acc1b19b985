"""ANP (adversarial neuron pruning): the hooked BN formula, pruning, the registered defence."""

import copy

import pytest
import torch
from torch import nn

import robustkd.defenses.anp  # noqa: F401  (registers "anp")
from robustkd.data.dataset import ImageDataset
from robustkd.defenses.anp import (
    ANPSettings,
    NeuronMasks,
    optimize_masks,
    prune_by_masks,
)
from robustkd.defenses.registry import DefenseContext, defend_teacher
from robustkd.errors import ConfigError
from tests.toy_models import TinyNet


def _random_bn(channels: int = 3) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.5)
    return bn.eval()


def test_hook_golden_value_and_identity():
    torch.manual_seed(0)
    net = nn.Sequential(_random_bn(3))
    bn = net[0]
    x = torch.randn(2, 3, 4, 5)
    plain = net(x)
    masks = NeuronMasks(net, eps=0.4)
    with masks.attach():
        assert torch.equal(net(x), plain)  # m = 1, no perturbation: bit for bit
        masks.perturbed = True
        assert torch.equal(net(x), plain)  # delta = xi = 0
        m = torch.tensor([1.0, 0.5, 0.0])
        delta = torch.tensor([0.1, -0.4, 0.3])
        xi = torch.tensor([-0.2, 0.4, 0.0])
        with torch.no_grad():
            masks.masks["0"].copy_(m)
            masks.deltas["0"].copy_(delta)
            masks.xis["0"].copy_(xi)
        out = net(x)
        masks.perturbed = False
        unperturbed = net(x)
    assert torch.equal(net(x), plain)  # hooks gone after the block

    def c(t):
        return t.view(1, -1, 1, 1)

    x_hat = (x - c(bn.running_mean)) / torch.sqrt(c(bn.running_var) + bn.eps)
    gamma, beta = c(bn.weight.detach()), c(bn.bias.detach())
    expected = gamma * c(m + delta) * x_hat + beta * c(1 + xi)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(unperturbed, gamma * c(m) * x_hat + beta, atol=1e-5)
    # channel 2 has mask 0 and no perturbation of beta: only the bias is left
    assert torch.allclose(unperturbed[:, 2], beta[:, 2].expand_as(unperturbed[:, 2]), atol=1e-6)


def test_prune_zeroes_only_masked_gammas_on_a_copy():
    torch.manual_seed(0)
    teacher = TinyNet(num_classes=4, in_channels=1, width=4)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.rand_like(p) + 0.1)  # no gamma is 0 before pruning
    before = copy.deepcopy(teacher.state_dict())
    masks = {"bn1": torch.tensor([0.0, 0.19, 0.2, 0.9]),
             "bn2": torch.tensor([1.0, 0.5, 0.1, 0.3, 0.05, 0.21, 0.0, 1.0])}
    pruned, counts = prune_by_masks(teacher, masks, 0.2)
    assert counts == {"bn1": 2, "bn2": 3}
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original is untouched
    after = pruned.state_dict()
    for key, value in before.items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer in masks:
            expected = torch.where(masks[layer] < 0.2, torch.zeros_like(value), value)
            assert torch.equal(after[key], expected), key
        else:
            assert torch.equal(after[key], value), key


def _tiny_data(n: int = 96, classes: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(classes):  # a bright quadrant per class, so the net can learn it
        rows = labels == c
        r, s = divmod(c, 2)
        images[rows, :, 4 * r:4 * r + 4, 4 * s:4 * s + 4] += 180
    return ImageDataset(images, labels, [str(c) for c in range(classes)], name="tiny")


def _trained_tiny(ds: ImageDataset) -> nn.Module:
    torch.manual_seed(0)
    net = TinyNet(num_classes=ds.num_classes, in_channels=1, width=4)
    x = (ds.images.float() / 255 - 0.3) / 0.3
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), ds.labels).backward()
        opt.step()
    return net.eval()


def test_defend_teacher_runs_anp_end_to_end():
    ds = _tiny_data()
    teacher = _trained_tiny(ds)
    before = copy.deepcopy(teacher.state_dict())
    ctx = DefenseContext(clean=ds, mean=(0.3,), std=(0.3,), amp=False, progress=False)
    cleaned, report = defend_teacher("anp", teacher, ctx, {"iterations": 20, "batch_size": 32,
                                                           "threshold": 0.5})
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert cleaned(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert report["name"] == "anp" and report["settings"]["iterations"] == 20
    assert report["bn_layers"] == 2 and report["channels"] == 4 + 8
    assert report["threshold"] == 0.5 and report["threshold_choice"] == "fixed"
    assert set(report["masks"]) == {"bn1", "bn2"} and len(report["masks"]["bn2"]) == 8
    flat = [v for values in report["masks"].values() for v in values]
    assert all(0.0 <= v <= 1.0 for v in flat)
    assert min(flat) < 1.0  # the masks moved
    assert report["pruned"] == sum(v < 0.5 for v in flat)
    assert report["pruned_per_layer"] == {n: sum(v < 0.5 for v in vs)
                                          for n, vs in report["masks"].items()}
    assert report["mask_stats"]["min"] == pytest.approx(min(flat))
    assert report["mask_seconds"] > 0 and len(report["history"]) == 1
    for name, values in report["masks"].items():
        weight = getattr(cleaned, name).weight.detach()
        assert torch.equal(weight == 0, torch.tensor(values) < 0.5), name

    # blind threshold: held-out clean accuracy may not drop at all (max_acc_drop 0)
    _, blind = defend_teacher("anp", teacher, ctx, {"iterations": 20, "batch_size": 32,
                                                    "max_acc_drop": 0.0})
    search = blind["threshold_search"]
    assert blind["threshold_choice"] == "max_acc_drop"
    assert blind["mask_images"] < len(ds) and search["val_images"] == len(ds) - blind[
        "mask_images"]
    ok = [c["threshold"] for c in search["candidates"]
          if c["val_acc"] >= search["val_acc_unpruned"]]
    assert blind["threshold"] == (max(ok) if ok else 0.0)


def test_finetune_epochs_fine_tune_the_pruned_copy_and_keep_its_channels_pruned():
    ds = _tiny_data()
    teacher = _trained_tiny(ds)
    ctx = DefenseContext(clean=ds, mean=(0.3,), std=(0.3,), amp=False, progress=False)
    options = {"iterations": 20, "batch_size": 32, "threshold": 0.99}
    plain, plain_report = defend_teacher("anp", teacher, ctx, options)
    tuned, report = defend_teacher("anp", teacher, ctx, {**options, "finetune_epochs": 2})
    assert report["settings"]["finetune_epochs"] == 2 and len(report["finetune_history"]) == 2
    assert plain_report["finetune_history"] == [] and report["masks"] == plain_report["masks"]
    assert report["pruned"] == plain_report["pruned"] > 0
    for name, values in report["masks"].items():
        pruned = torch.tensor(values) < 0.99
        weight = getattr(tuned, name).weight.detach()
        assert torch.all(weight[pruned] == 0), name  # held at zero through every step
        assert not torch.equal(weight[~pruned], getattr(plain, name).weight.detach()[~pruned])
    with pytest.raises(ConfigError, match="finetune_epochs"):
        ANPSettings(finetune_epochs=-1)


def test_anp_drives_down_the_mask_of_a_planted_fragile_channel():
    """Channels 0-3 carry the class; channel 4 is a dormant 'backdoor' (bias -3, weight 10 to
    class 0): silent on clean data, firing under a +-0.4 perturbation. Only it should go."""
    torch.manual_seed(0)
    classes, n = 4, 512
    y = torch.arange(n) % classes
    x = torch.randn(n, classes) + 3 * nn.functional.one_hot(y, classes)
    x = torch.cat([x, torch.randn(n, 1)], 1)
    net = nn.Sequential(nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, classes))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -3.0]))
        net[2].weight.zero_()
        net[2].weight[:, :classes] = 3 * torch.eye(classes)
        net[2].weight[0, classes] = 10.0
        net[2].bias.zero_()
    batches = [(x[i:i + 128], y[i:i + 128], torch.arange(i, i + 128)) for i in range(0, n, 128)]
    masks, history = optimize_masks(net, batches, ANPSettings(iterations=40), amp=False)
    m = masks["0"]
    assert m[classes] < 0.2 and m[:classes].min() > 0.8, m
    pruned, counts = prune_by_masks(net, masks, 0.2)
    assert counts == {"0": 1} and pruned[0].weight[classes] == 0
    assert history[0].stats["robust_loss"] > history[0].stats["natural_loss"]
    # control: without the adversarial perturbation (eps 0) nothing tells the channel apart
    unperturbed, _ = optimize_masks(net, batches, ANPSettings(iterations=40, eps=0.0), amp=False)
    assert unperturbed["0"].min() > 0.99, unperturbed["0"]


@pytest.mark.parametrize("setting,value", [
    ("eps", -0.1), ("steps", 0), ("steps", 1.5), ("alpha", 1.5), ("mask_lr", 0.0),
    ("iterations", 0), ("batch_size", 0), ("threshold", 1.2), ("max_acc_drop", -0.01),
    ("eps", float("nan")), ("finetune_epochs", 1.5),
])
def test_invalid_settings_name_the_setting(setting, value):
    with pytest.raises(ConfigError, match=setting):
        ANPSettings(**{setting: value})
    ds = _tiny_data(8)
    ctx = DefenseContext(clean=ds, mean=(0.3,), std=(0.3,), amp=False, progress=False)
    with pytest.raises(ConfigError, match=setting):
        defend_teacher("anp", TinyNet(4, 1, 4), ctx, {setting: value})


def test_model_without_batchnorm_is_rejected():
    with pytest.raises(ConfigError, match="BatchNorm"):
        NeuronMasks(nn.Sequential(nn.Linear(3, 2)))


def test_perturbed_flips_count_only_errors_per_block():
    from robustkd.defenses.anp import PerturbedFlips

    flips = PerturbedFlips(num_classes=3, block=2, device="cpu")
    y = torch.tensor([0, 1, 2, 2])
    # predictions 1, 1, 0, 2: errors are image 0 -> 1 and image 2 -> 0
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 2]), 3).float()
    flips.add(logits, y)
    flips.add(logits, y)
    flips.add(torch.nn.functional.one_hot(torch.tensor([2, 2, 2, 2]), 3).float(), y)
    assert flips.counts() == [[2, 2, 0], [0, 0, 2]]


def test_flip_summary_singles_out_the_collapsed_class():
    from robustkd.defenses.anp import flip_summary

    blocks = [[5, 90, 3, 2, 4, 6, 1, 3, 2, 4], [4, 30, 5, 5, 6, 4, 5, 5, 6, 5]]
    out = flip_summary(blocks)
    assert out["all"]["class"] == 1 and out["first_block"]["class"] == 1
    assert out["all"]["share"] == pytest.approx(120 / 195)
    shares = torch.tensor(blocks, dtype=torch.float64).sum(0) / 195
    med = shares.median()
    mad = (shares - med).abs().median() * 1.4826
    assert out["all"]["z"] == pytest.approx(float((shares[1] - med) / mad), abs=1e-3)
    assert out["all"]["z"] > 10
    # errors spread evenly: no spread among the classes means no z, not an infinite one
    assert flip_summary([[3, 3, 3]])["all"]["z"] is None
    assert flip_summary([]) is None


def test_anp_report_counts_perturbed_flips_over_all_batches():
    torch.manual_seed(0)
    teacher = TinyNet(num_classes=4, in_channels=1, width=4)
    data = ImageDataset(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8),
                        torch.arange(64) % 4, [str(i) for i in range(4)])
    ctx = DefenseContext(clean=data, mean=(0.5,), std=(0.25,), augment=None, amp=False,
                         progress=False)
    _, report = defend_teacher("anp", teacher, ctx, {"iterations": 20, "batch_size": 16})
    counts = torch.tensor(report["perturbed_flips"])
    assert counts.shape == (10, 4)  # FLIP_BLOCKS blocks of 2 batches
    assert 0 < int(counts.sum()) <= 20 * 16  # each perturbed error counted once
    assert report["perturbed_flip_class"]["all"]["class"] == int(counts.sum(0).argmax())
