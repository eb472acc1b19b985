"""Shared fixtures: the embedded digits data and one clean teacher trained on it once."""

import copy

import pytest
import torch

from robustkd import api
from robustkd.data import load_dataset
from robustkd.models import build_model
from robustkd.training.classifier import train_classifier
from robustkd.training.optim import OptimConfig


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def _digits_teacher(digits):
    torch.manual_seed(0)
    net = build_model("wrn10_2", num_classes=10, in_channels=1)
    train_classifier(net, digits.train, digits.test, mean=digits.mean, std=digits.std,
                     augment=digits.augment, epochs=10, optim=OptimConfig(lr=0.05,
                     schedule="cosine"), batch_size=64, progress=False, eval_every=0)
    return net


@pytest.fixture
def digits_teacher(_digits_teacher):
    """A fresh copy per test, so a test that poisons or edits it cannot leak into others."""
    return copy.deepcopy(_digits_teacher)


@pytest.fixture(scope="session")
def digits_teacher_run(tmp_path_factory):
    """A one-epoch digits run directory, for tests that only need a teacher to distil from
    (read only)."""
    out = tmp_path_factory.mktemp("digits_run") / "t"
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=out, device="cpu",
              progress=False)
    return out
