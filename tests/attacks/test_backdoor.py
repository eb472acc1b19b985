"""BadNets on a tiny model and real data: the backdoor takes, clean accuracy stays."""

import pytest

from robustkd.attacks import patch_trigger, poison_dataset
from robustkd.evaluation.metrics import accuracy, attack_success_rate
from robustkd.training.classifier import train_classifier
from robustkd.training.optim import OptimConfig


@pytest.mark.slow
def test_badnets_finetune_reaches_high_asr_and_keeps_accuracy(digits, digits_teacher):
    model = digits_teacher
    kw = {"mean": digits.mean, "std": digits.std, "augment": digits.augment,
          "batch_size": 64, "progress": False, "eval_every": 0}
    clean_acc = accuracy(model, digits.test, digits.mean, digits.std)
    trigger = patch_trigger(digits.train.image_size, 1, size=3, position="br")
    clean_asr = attack_success_rate(model, digits.test, trigger, 0, digits.mean, digits.std)
    assert clean_acc > 0.9
    assert clean_asr < 0.3  # a clean model ignores the patch

    poisoned = poison_dataset(digits.train, trigger, target=0, ratio=0.1, seed=0)
    train_classifier(model, poisoned, digits.test, epochs=5, seed=1,
                     optim=OptimConfig(lr=0.01, schedule="constant"), **kw)
    acc = accuracy(model, digits.test, digits.mean, digits.std)
    asr = attack_success_rate(model, digits.test, trigger, 0, digits.mean, digits.std)
    assert asr >= 0.9
    assert acc >= clean_acc - 0.04
