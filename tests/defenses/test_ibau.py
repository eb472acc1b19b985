"""I-BAU teacher defence: the implicit hypergradient against closed forms and finite
differences, the bounded universal perturbation, the registered defence, its settings."""

import math

import pytest
import torch
from torch import nn

import robustkd.defenses.ibau  # noqa: F401  (registers "ibau")
from robustkd.data.dataset import ImageDataset
from robustkd.defenses.ibau import (
    IBAUSettings,
    gradient_step_map,
    implicit_hypergradient,
    inner_objective,
    perturb,
    universal_perturbation,
    unlearn_step,
)
from robustkd.defenses.registry import TEACHER_DEFENSES, DefenseContext, defend_teacher
from robustkd.errors import ConfigError
from tests.toy_models import TinyNet

D64 = torch.float64


def _quadratic():
    """Inner g = 1/2 d'Ad - d'B theta (minimiser A^-1 B theta), outer L = 1/2|d - c|^2 + w'theta."""
    a = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]], dtype=D64)
    b = torch.tensor([[1.0, -0.5], [0.2, 0.7], [-0.4, 0.3]], dtype=D64)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
    w = torch.tensor([0.1, -0.2], dtype=D64)
    theta = torch.tensor([0.7, -1.3], dtype=D64, requires_grad=True)
    unused = torch.ones(2, dtype=D64, requires_grad=True)  # theta the losses never read
    return a, b, c, w, theta, unused


def test_hypergradient_matches_the_closed_form_on_a_quadratic():
    a, b, c, w, theta, unused = _quadratic()
    step = 0.3  # J = I - 0.3 A has eigenvalues in (0, 1): Phi contracts
    phi = gradient_step_map(lambda d: 0.5 * d @ a @ d - d @ (b @ theta), step)

    def outer(d):
        return 0.5 * (d - c).pow(2).sum() + w @ theta

    d_star = torch.linalg.solve(a, b @ theta).detach()
    # exact: differentiate L(delta*(theta), theta) through the linear solve
    exact = torch.autograd.functional.jacobian(
        lambda t: 0.5 * (torch.linalg.solve(a, b @ t) - c).pow(2).sum() + w @ t,
        theta.detach())
    assert torch.allclose(exact, w + b.T @ torch.linalg.solve(a, d_star - c))

    grads, loss = implicit_hypergradient(d_star, [theta, unused], phi, outer, 200, tol=1e-14)
    assert torch.allclose(grads[0], exact, atol=1e-10, rtol=0)
    assert torch.equal(grads[1], torch.zeros(2, dtype=D64))
    assert loss.item() == pytest.approx(outer(d_star).item())

    # K iterations from v = 0 are the truncated Neumann series sum_{k<K} (J^T)^k dL/ddelta;
    # dPhi/dtheta = step * B
    jac = torch.eye(3, dtype=D64) - step * a
    for k in (0, 1, 3):
        v = sum((torch.linalg.matrix_power(jac.T, i) @ (d_star - c) for i in range(k)),
                torch.zeros(3, dtype=D64))
        truncated = w + (step * b).T @ v
        got, _ = implicit_hypergradient(d_star, [theta], phi, outer, k)
        assert torch.allclose(got[0], truncated, atol=1e-12, rtol=0), k
        if k < 3:  # the truncation is visible: the test can tell K apart
            assert (got[0] - exact).abs().max() > 1e-2


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x_pix = 0.35 + 0.3 * torch.rand(5, 1, 2, 2, dtype=D64)  # far from the [0, 1] clamp
    mean, std = torch.tensor([0.4], dtype=D64), torch.tensor([0.2], dtype=D64)
    x = (x_pix - mean) / std
    y = torch.tensor([0, 1, 2, 1, 0])
    return model, x, y, mean, std


def test_unlearn_step_matches_finite_differences_through_the_inner_solution():
    model, x, y, mean, std = _linear_problem()
    params = list(model.parameters())
    reg, step = 3.0, 0.2
    cfg = IBAUSettings(inner_reg=reg, fixed_point_lr=step, hypergrad_iterations=80)
    rows = torch.ones(5, dtype=torch.bool)
    # reg 3 makes -CE + reg |d|^2 strongly convex here, and Phi = d - 0.2 grad a contraction
    hess = torch.autograd.functional.hessian(
        lambda d: inner_objective(model, x, y, d.view(1, 1, 2, 2), mean, std, reg),
        torch.zeros(4, dtype=D64))
    eig = torch.linalg.eigvalsh(hess)
    assert eig.min() > 0 and (1 - step * eig).abs().max() < 0.9

    def solve() -> torch.Tensor:
        phi = gradient_step_map(lambda d: inner_objective(model, x, y, d, mean, std, reg), step)
        d = torch.zeros(1, 1, 2, 2, dtype=D64)
        with torch.enable_grad():  # called under no_grad while the weights are nudged
            for _ in range(100):
                d = phi(d.requires_grad_(True)).detach()
        return d

    def total() -> float:
        d = solve()
        with torch.no_grad():
            logits = model(perturb(x, d, mean, std, rows))
            return torch.nn.functional.cross_entropy(logits, y).item()

    d_star = solve()
    assert d_star.norm() > 1e-2 and (perturb(x, d_star, mean, std) * std + mean).min() > 0
    grads, _ = unlearn_step(model, params, x, y, d_star, rows, cfg, mean, std)
    plain, _ = unlearn_step(model, params, x, y, d_star, rows,
                            IBAUSettings(inner_reg=reg, fixed_point_lr=step,
                                         hypergrad_iterations=0), mean, std)
    eps = 1e-6
    for p, g, g0 in zip(params, grads, plain, strict=True):
        fd = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                p.view(-1)[i] += eps
                up = total()
                p.view(-1)[i] -= 2 * eps
                down = total()
                p.view(-1)[i] += eps
                fd.view(-1)[i] = (up - down) / (2 * eps)
        assert torch.allclose(g, fd, atol=1e-7, rtol=1e-5)
        assert (g0 - fd).abs().max() > 1e-4  # without the implicit term it is wrong


def _images(n=48, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ImageDataset(images=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8,
                                             generator=gen),
                        labels=torch.randint(0, classes, (n,), generator=gen),
                        classes=[str(i) for i in range(classes)], name="synthetic")


def _net(seed=0):
    torch.manual_seed(seed)
    return TinyNet(num_classes=4, in_channels=1).eval()


def test_universal_perturbation_is_bounded_and_raises_the_loss():
    model, ds = _net(), _images()
    with torch.no_grad():
        model.fc.weight.mul_(10)  # a confident model, as a trained teacher is
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    x = ((ds.images.float() / 255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    batches = [(x[i:i + 16], ds.labels[i:i + 16]) for i in range(0, 48, 16)] * 4

    def run(radius):
        return universal_perturbation(model, batches, shape=(1, 8, 8), mean=mean, std=std,
                                      radius=radius, lr=10.0, reg=0.001)

    free, _ = run(1e6)
    assert free.norm() > 4.0  # unconstrained ascent leaves a radius-2 ball
    delta, ce = run(2.0)
    assert delta.shape == (1, 1, 8, 8) and not delta.requires_grad
    assert delta.norm().item() <= 2.0 * (1 + 1e-5)
    assert delta.norm().item() == pytest.approx(2.0, rel=1e-4)  # the bound is active
    with torch.no_grad():
        y_hat = model(x).argmax(1)  # the inner labels: the model's own predictions
        before = torch.nn.functional.cross_entropy(model(x), y_hat)
        after = torch.nn.functional.cross_entropy(model(perturb(x, delta, mean, std)), y_hat)
    assert after > before + 0.1
    assert math.isfinite(ce.item()) and ce > before  # mean CE along the ascent


def _ctx(ds, **kw):
    return DefenseContext(clean=ds, mean=(0.5,), std=(0.25,), progress=False, amp=False, **kw)


def test_ibau_defence_cleans_a_copy_and_reports():
    assert "ibau" in TEACHER_DEFENSES and "Zeng" in TEACHER_DEFENSES["ibau"].help
    teacher = _net()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cleaned, report = defend_teacher(
        "ibau", teacher, _ctx(_images()),
        {"rounds": 1, "batch_size": 16, "inner_steps": 2, "radius": 3.0})
    assert cleaned is not teacher and not teacher.training and not cleaned.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"original teacher {key} changed"
    assert any(not torch.equal(v, before[k]) for k, v in cleaned.state_dict().items()
               if v.is_floating_point())
    assert report["name"] == "ibau" and report["settings"]["rounds"] == 1
    assert report["seconds"] > 0 and report["unlearn_seconds"] > 0
    assert len(report["round_loss"]) == 1 and math.isfinite(report["round_loss"][0])
    assert 0 < report["perturbation_norm"] <= 3.0 * (1 + 1e-5)
    used = report["settings_used"]
    assert used["inner_steps"] == 2 and used["batches_per_round"] == 3
    assert used["perturbed_per_batch"] == [1]  # int(16 * 0.01) = 0, raised to one
    assert used["hypergrad_iterations"] == 5 and used["lr"] == 0.0001
    assert report["history"][0]["perturbation_norm"] == report["perturbation_norm"]
    assert report["cleaned_teacher_metrics"] is None  # no test set given, none used

    # defaults: one ascent step per batch of one pass; the same seed gives the same copy
    again, rep = defend_teacher("ibau", _net(), _ctx(_images()),
                                {"rounds": 1, "batch_size": 16})
    twice, _ = defend_teacher("ibau", _net(), _ctx(_images()), {"rounds": 1, "batch_size": 16})
    assert rep["settings_used"]["inner_steps"] == 3
    for (k, v), w in zip(again.state_dict().items(), twice.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("name, value", [
    ("rounds", -1), ("rounds", 1.5), ("inner_steps", 0), ("inner_lr", 0.0),
    ("inner_lr", float("nan")), ("inner_reg", -0.1), ("radius", 0), ("radius", "ten"),
    ("hypergrad_iterations", -1), ("fixed_point_lr", -0.1), ("perturbed_fraction", 0.0),
    ("perturbed_fraction", 1.5), ("lr", 0.0), ("batch_size", 0), ("batch_size", True),
])
def test_invalid_settings_raise_config_error_naming_them(name, value):
    with pytest.raises(ConfigError, match=rf"\b{name}\b"):
        defend_teacher("ibau", _net(), _ctx(_images(8)), {name: value})


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="no setting"):
        defend_teacher("ibau", _net(), _ctx(_images(8)), {"n_rounds": 1})


def test_max_images_unlearns_on_a_per_class_part_of_the_clean_data():
    labels = torch.arange(64) % 4
    ds = ImageDataset(images=torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8),
                      labels=labels, classes=[str(i) for i in range(4)], name="balanced")
    _, rep = defend_teacher("ibau", _net(), _ctx(ds),
                            {"rounds": 1, "batch_size": 8, "max_images": 16})
    used = rep["settings_used"]
    assert used["images"] == 16 and used["batches_per_round"] == 2
    _, full = defend_teacher("ibau", _net(), _ctx(ds), {"rounds": 1, "batch_size": 8})
    assert full["settings_used"]["images"] == 64
    with pytest.raises(ConfigError, match=r"max_images \(--ibau-max-images\) must be >= 1"):
        defend_teacher("ibau", _net(), _ctx(ds), {"max_images": 0})
