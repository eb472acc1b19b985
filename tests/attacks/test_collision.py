"""Feature-collision poisoning: the loss's value, that training with it pulls poisoned
images' deepest features onto the target class's, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from robustkd.attacks import AttackContext, get_attack, poison_dataset
from robustkd.attacks.collision import collision_loss
from robustkd.cli import main
from robustkd.data.loader import normalize
from robustkd.errors import ConfigError
from robustkd.models.layers import layers_of
from robustkd.models.taps import tap
from robustkd.runs import load_run
from robustkd.training.classifier import train_classifier
from robustkd.training.optim import OptimConfig


def test_collision_loss_golden_value_and_its_anchor_carries_no_gradient():
    feats = torch.zeros(4, 2, 2, 2)
    feats[0] = 1.0  # clean target: pooled (1, 1)
    feats[1] = 3.0  # clean target: pooled (3, 3) -> anchor (2, 2)
    feats[2, 0] = 4.0  # poison: pooled (4, 0) -> squared distances 4 and 4
    feats[3] = 5.0  # clean, another class: ignored
    feats.requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1])
    poison = torch.tensor([False, False, True, False])
    loss = collision_loss(feats, labels, poison, target=0)
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    assert feats.grad[2].abs().sum() > 0
    assert feats.grad[0].abs().sum() == 0 and feats.grad[3].abs().sum() == 0
    none = collision_loss(feats, labels, torch.zeros(4, dtype=torch.bool), target=0)
    assert none.item() == 0.0 and none.requires_grad
    no_anchor = collision_loss(feats, torch.tensor([1, 1, 0, 1]), poison, target=0)
    assert no_anchor.item() == 0.0


def _target_distance(model, digits, trigger, layer) -> float:
    """Mean squared distance of triggered non-target test images' pooled features from the
    clean target images' mean (eval mode)."""
    model.eval()
    x, y = digits.test.images.float() / 255, digits.test.labels
    with torch.no_grad(), tap(model, [layer], detach=True) as feats:
        model(normalize(x, digits.mean, digits.std))
        clean = feats[layer].flatten(2).mean(2)
        model(normalize(trigger.apply(x[y != 0]), digits.mean, digits.std))
        triggered = feats[layer].flatten(2).mean(2)
    return float(((triggered - clean[y == 0].mean(0)) ** 2).mean())


@pytest.mark.slow
def test_collision_training_pulls_triggered_features_onto_the_target_class(digits,
                                                                           digits_teacher):
    kw = {"mean": digits.mean, "std": digits.std, "augment": digits.augment, "epochs": 2,
          "optim": OptimConfig(lr=0.01, schedule="constant"), "batch_size": 64, "seed": 1,
          "progress": False, "eval_every": 0}
    layer = layers_of(digits_teacher)[-1].prerelu
    distance = {}
    for weight in (0.0, 1.0):
        spec = get_attack("blended-collision")
        settings = spec.make_settings({"alpha": 0.2, "weight": weight})
        ctx = AttackContext(digits, None, settings, "cpu", target=0, progress=False)
        trigger = spec.build_trigger(ctx)
        poisoned = poison_dataset(digits.train, trigger, 0, 0.1, seed=0)
        model = copy.deepcopy(digits_teacher)
        torch.manual_seed(0)
        train_classifier(model, poisoned, digits.test,
                         extra_loss=spec.extra_loss(ctx, model, poisoned), **kw)
        distance[weight] = _target_distance(model, digits, trigger, layer)
    assert distance[1.0] < 0.7 * distance[0.0], distance


def test_attack_cli_records_the_weight_and_refuses_a_bad_one(tmp_path):
    out = tmp_path / "collide"
    assert main(["attack", "--attack", "blended-collision", "--model", "wrn10_1",
                 "--dataset", "digits", "--epochs", "1", "--blended-collision-weight", "0.5",
                 "--out", str(out), "--device", "cpu", "--no-progress",
                 "--eval-every", "0"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["trigger"]["params"]["collision_weight"] == 0.5
    assert any("collision_loss" in h for h in rec["history"])
    assert load_run(out).trigger.kind == "blend"  # the base attack's trigger
    with pytest.raises(ConfigError, match="weight"):
        get_attack("badnets-collision").make_settings({"weight": -1})
