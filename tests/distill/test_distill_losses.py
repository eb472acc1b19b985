"""Distillation losses against hand computations; FKD margin against numerical integration."""

import math

import numpy as np
import pytest
import torch

from robustkd.distill.losses import (
    bn_margin,
    empirical_margin,
    fkd_feature_loss,
    kd_loss,
    margin_relu,
    partial_l2,
    soft_target_loss,
    stage_weights,
)


def test_partial_l2_by_hand():
    s = torch.tensor([[1.0, -2.0, -0.5, 3.0]])
    t = torch.tensor([[0.5, -1.0, -1.0, 4.0]])
    # element 0: t>0 -> (0.5)^2; element 1: s<=t, t<=0 -> skipped;
    # element 2: s>t -> (0.5)^2; element 3: t>0 -> 1
    assert partial_l2(s, t).item() == pytest.approx(0.25 + 0.25 + 1.0)


def test_margin_relu_per_channel():
    f = torch.tensor([[[[-3.0]], [[-0.1]]]])  # [1, 2, 1, 1]
    out = margin_relu(f, torch.tensor([-1.0, -0.5]))
    assert out.flatten().tolist() == pytest.approx([-1.0, -0.1])


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    T, a = 2.0, 0.7
    ps = np.exp([0.5, 0.0]) / np.exp([0.5, 0.0]).sum()
    pt = np.exp([0.0, 0.5]) / np.exp([0.0, 0.5]).sum()
    kl = float((pt * np.log(pt / ps)).sum())
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))
    assert kd_loss(s, t, y, T, a).item() == pytest.approx(a * T * T * kl + (1 - a) * ce, rel=1e-5)


@pytest.mark.parametrize("gamma,beta", [(1.0, 0.0), (0.5, 0.3), (2.0, -1.0), (0.3, 0.6)])
def test_bn_margin_matches_numerical_conditional_mean(gamma, beta):
    s = abs(gamma)
    x = np.linspace(beta - 12 * s, 0.0, 200001)
    pdf = np.exp(-0.5 * ((x - beta) / s) ** 2)
    numeric = np.trapezoid(x * pdf, x) / np.trapezoid(pdf, x)
    m = bn_margin(torch.tensor([gamma]), torch.tensor([beta])).item()
    assert m == pytest.approx(numeric, rel=1e-3)


def test_bn_margin_falls_back_when_negative_tail_is_tiny():
    m = bn_margin(torch.tensor([0.1, -0.1]), torch.tensor([1.0, 1.0]))
    assert m.tolist() == pytest.approx([-0.3, -0.3])


def test_empirical_margin_is_mean_of_negative_values():
    f = torch.tensor([[[[-1.0, 2.0]], [[3.0, 4.0]]], [[[-3.0, 0.5]], [[1.0, 1.0]]]])
    assert empirical_margin(f).tolist() == pytest.approx([-2.0, 0.0])


def test_stage_weights_and_weighted_sum():
    assert stage_weights(3) == [0.25, 0.5, 1.0]
    s = [torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1) * 2]
    t = [torch.zeros(1, 1, 1, 1) + 3, torch.zeros(1, 1, 1, 1) + 5]
    m = [torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert fkd_feature_loss(s, t, m).item() == pytest.approx(0.5 * 4 + 1.0 * 9)


def test_soft_target_loss_is_kd_without_its_label_term():
    s, t, y = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]]), torch.tensor([1])
    assert soft_target_loss(s, t, 3.0).item() == pytest.approx(kd_loss(s, t, y, 3.0, 1.0).item())
    assert soft_target_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
