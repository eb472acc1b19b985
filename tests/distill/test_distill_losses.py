"""Distillation losses against hand computations; FKD margin against numerical integration."""

import math

import numpy as np
import pytest
import torch

from robustkd.distill.losses import (
    bn_margin,
    empirical_margin,
    fkd_feature_loss,
    flat_view,
    kd_loss,
    margin_partial_l2,
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


def _partial_l2_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The definition, left to autograd: (s - t)^2 where s > t or t > 0."""
    s, t = s.float(), t.float()
    return ((s - t) ** 2 * ((s > t) | (t > 0))).sum()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_l2_value_and_gradients_match_autograd(dtype, memory_format):
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(4, 3, 5, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    t0 = torch.randn(4, 3, 5, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    t0[0, 0, 0, :2] = s0[0, 0, 0, :2]  # ties: no contribution, zero gradient
    results = []
    for fn in (partial_l2, _partial_l2_reference):
        s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        value = fn(s, t)
        (3.0 * value).backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        results.append((value.detach(), s.grad, t.grad))
    (v, gs, gt), (v_ref, gs_ref, gt_ref) = results
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(v_ref.item(), rel=1e-5)
    assert torch.allclose(gs.float(), gs_ref.float(), rtol=rtol)
    assert torch.allclose(gt.float(), gt_ref.float(), rtol=rtol)
    assert torch.equal(gs[0, 0, 0, :2], torch.zeros(2, dtype=dtype))
    assert gs.is_contiguous(memory_format=memory_format)  # the student's layout, kept


def test_flat_view_of_a_channels_last_map_is_a_view_of_every_element():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    flat = flat_view(x)
    assert flat.data_ptr() == x.data_ptr() and flat.numel() == x.numel()
    assert torch.equal(flat.sort().values, x.reshape(-1).sort().values)
    plain = torch.randn(2, 3, 4, 5)
    assert torch.equal(flat_view(plain), plain.reshape(-1))


def test_partial_l2_gradient_is_finite_difference_exact():
    s = torch.tensor([0.3, -2.0, -0.5, 3.0, -0.2], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, -1.0, -1.0, 4.0, -0.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: partial_l2(a, t).double(), (s,))


def _margin_case(memory_format, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 6, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    t = torch.randn(3, 4, 6, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    t[0, 0, 0, :2] = s[0, 0, 0, :2]  # ties: no contribution
    return s, t, -torch.rand(4, generator=g) - 0.1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("fuse", [False, True])
def test_margin_partial_l2_is_partial_l2_of_the_margin_relu(fuse, memory_format):
    """Fused (compiled, one pass) or not: the value and student gradient of the definition;
    the teacher is a constant."""
    s0, t0, m = _margin_case(memory_format)
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    value = margin_partial_l2(s, t, m, fuse=fuse)
    (2.5 * value).backward()
    s_ref = s0.clone().requires_grad_(True)
    ref = _partial_l2_reference(s_ref, margin_relu(t0, m))
    (2.5 * ref).backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(s.grad[0, 0, 0, :2], torch.zeros(2))
    assert t.grad is None
    assert s.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("fuse", [False, True])
def test_margin_partial_l2_under_bf16_computes_in_float32(fuse):
    s0, t0, m = _margin_case(torch.channels_last, torch.bfloat16)
    s = s0.clone().requires_grad_(True)
    value = margin_partial_l2(s, t0, m, fuse=fuse)
    value.backward()
    ref = _partial_l2_reference(s0, margin_relu(t0.float(), m))  # a float32 margin
    assert value.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)


def test_large_maps_fuse_and_a_failed_compile_falls_back_once(monkeypatch):
    """Maps of FUSE_MIN_ELEMENTS or more take the compiled pass; if compiling fails, the
    unfused loss is computed, with one warning, and fusion is not tried again."""
    import robustkd.distill.losses as losses

    calls = []

    def broken():
        def compiled(*args):
            calls.append(args[0].shape)
            raise RuntimeError("no C++ compiler found\ndetails")
        return compiled

    monkeypatch.setattr(losses, "_fused_terms", broken)
    monkeypatch.setitem(losses._fusion, "usable", True)
    monkeypatch.setattr(losses, "FUSE_MIN_ELEMENTS", 100)
    s, t, m = _margin_case(torch.contiguous_format)
    small_s, small_t = s[:1, :1], t[:1, :1]  # 30 elements: eager, the compiler not asked
    small = margin_partial_l2(small_s, small_t, m[:1])
    assert calls == [] and small.item() == pytest.approx(
        _partial_l2_reference(small_s, margin_relu(small_t, m[:1])).item(), rel=1e-6)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*no C\\+\\+ compiler"):
        value = margin_partial_l2(s, t, m)
    assert calls == [s.shape] and losses._fusion["usable"] is False
    assert value.item() == pytest.approx(
        _partial_l2_reference(s, margin_relu(t, m)).item(), rel=1e-5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        margin_partial_l2(s, t, m)  # no second try, no second warning
    assert len(calls) == 1


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


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_connector_folds_its_bn_into_the_conv_with_the_same_function(memory_format):
    """Training mode: BN's batch statistics from the input's mean and covariance, folded
    into the conv: output, every gradient and the running statistics as conv then BN."""
    from torch import nn

    from robustkd.distill.fkd import connector

    torch.manual_seed(0)
    folded = connector(6, 10).double()
    with torch.no_grad():
        folded[1].weight.uniform_(0.5, 2.0)
        folded[1].bias.normal_()
    plain = nn.Sequential(nn.Conv2d(6, 10, 1, bias=False), nn.BatchNorm2d(10)).double()
    plain.load_state_dict(folded.state_dict())  # the same keys: checkpoints carry over
    for _ in range(2):  # the second step reads the running statistics the first one wrote
        x = (torch.randn(8, 6, 5, 5, dtype=torch.double) * 3 + 2).contiguous(
            memory_format=memory_format).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, ref = folded(x), plain(x2)
        g = torch.randn_like(ref)
        (y * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(x.grad, x2.grad)
    for (name, a), b in zip(folded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(folded.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    folded.eval()
    plain.eval()
    x = torch.randn(4, 6, 5, 5, dtype=torch.double)
    torch.testing.assert_close(folded(x), plain(x))  # eval: BN's running statistics
