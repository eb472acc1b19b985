"""The student's online universal perturbation: where it applies, how it ascends, and that
it finds the direction a backdoored model answers to."""

import pytest
import torch

from robustkd.defenses.robustkd import robustkd_config
from robustkd.defenses.student_perturbation import (
    OnlinePerturbation,
    PerturbationSettings,
    compose,
)
from robustkd.errors import ConfigError

MEAN, STD = (0.5,), (0.25,)


def test_only_the_chosen_share_is_perturbed_within_the_bound():
    p = OnlinePerturbation(PerturbationSettings(0.5, eps=0.1, step=0.01), MEAN, STD, seed=0)
    x = (torch.rand(400, 1, 6, 6) - 0.5) / 0.25
    out = p(x)
    changed = (out != x).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65
    pixel_change = (out - x) * 0.25
    assert pixel_change.abs().max() <= 0.1 + 1e-6
    assert torch.equal(out[~changed], x[~changed])


def test_the_ascent_step_follows_the_gradient_sign_and_stays_in_the_box():
    p = OnlinePerturbation(PerturbationSettings(1.0, eps=0.1, step=0.04), MEAN, STD, seed=0)
    x = torch.zeros(8, 1, 4, 4)
    direction = torch.tensor([1.0, -1.0] * 8).view(1, 4, 4)
    for _ in range(6):  # the loss grows along +direction: delta must go to eps * direction
        out = p(x)
        (out * direction).sum().backward()
    p.ascend()
    assert p.steps == 6
    assert torch.allclose(p.delta.detach(), 0.1 * direction)
    assert p.summary()["at_bound"] == 1.0


def test_it_finds_the_pattern_a_backdoored_model_answers_to():
    """A linear 'student' that sends images carrying one pattern to class 1: ascending
    the loss of answering class 0 aligns the perturbation with that pattern."""
    torch.manual_seed(0)
    pattern = torch.randn(1, 8, 8).sign()
    w = torch.stack([torch.zeros(64), pattern.flatten() * 5.0])  # class 1 reads the pattern

    def loss_of(x):
        logits = (x.flatten(1) * 0.25 + 0.5) @ w.T
        return torch.nn.functional.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))

    p = OnlinePerturbation(PerturbationSettings(1.0, eps=0.1, step=0.01), MEAN, STD, seed=1)
    for _ in range(40):
        x = (torch.rand(32, 1, 8, 8) * 0.2 + 0.4 - 0.5) / 0.25
        loss_of(p(x)).backward()
    p.ascend()
    agreement = (p.delta.detach().sign() == pattern).float().mean()
    assert agreement > 0.95


def test_settings_are_checked_and_transforms_compose():
    with pytest.raises(ConfigError, match="share"):
        PerturbationSettings(0.0, eps=0.1, step=0.01)
    with pytest.raises(ConfigError, match="step"):
        PerturbationSettings(0.5, eps=0.1, step=0.2)
    with pytest.raises(ConfigError, match="student.perturbation"):
        robustkd_config({"student_perturbation": 1.5})
    cfg = robustkd_config({"preset": "student-uap"})
    assert not cfg.masks and cfg.student_perturbation == 0.5 and cfg.consistency == 0
    assert compose(None, None) is None
    add_one = compose(lambda x: x + 1, None, lambda x: x * 2)
    assert add_one(torch.ones(1)).item() == 4.0


def test_run_robustkd_with_the_student_perturbation_reports_its_steps(digits):
    from robustkd.data.subsets import per_class_subset
    from robustkd.defenses.robustkd import run_robustkd
    from robustkd.distill import DistillRun
    from robustkd.training.loop_settings import LoopSettings
    from robustkd.training.optim import OptimConfig
    from tests.toy_models import TinyNet

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    small = per_class_subset(digits.train, per_class=20)
    report = run_robustkd(
        teacher, student, small, None, robustkd_config({"preset": "student-uap"}),
        loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=32, progress=False),
        run=DistillRun(epochs=2, optim=OptimConfig(lr=0.05)),
        teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    steps = report["student_perturbation"]["steps"]
    assert report["masks"] is None and steps == 2 * (len(small) // 32) - 1
    assert 0 < report["student_perturbation"]["abs_mean"] <= 0.1


def test_append_mode_adds_perturbed_copies_of_the_first_rows():
    p = OnlinePerturbation(PerturbationSettings(0.25, eps=0.1, step=0.01, mode="append"),
                           MEAN, STD, seed=0)
    x = (torch.rand(40, 1, 6, 6) - 0.5) / 0.25
    out = p(x)
    assert out.shape[0] == 50 and torch.equal(out[:40], x)
    pixel_change = (out[40:] - x[:10]) * 0.25
    assert 0 < pixel_change.abs().max() <= 0.1 + 1e-6
    with pytest.raises(ConfigError, match="mode"):
        PerturbationSettings(0.5, eps=0.1, step=0.01, mode="swap")
    cfg = robustkd_config({"preset": "student-uat"})
    assert cfg.perturbation_mode == "append" and not cfg.masks


def test_fkd_trains_appended_rows_on_their_labels_without_teacher_features():
    """The loss with appended copies is the plain FKD loss of the batch plus the copies'
    cross-entropy on the labels of the rows they copy; a share over one row per row fails."""
    import torch.nn.functional as F

    from robustkd.distill import build_distiller
    from robustkd.models.layers import frozen_teacher
    from tests.toy_models import TinyNet

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    x, y = torch.randn(12, 1, 16, 16), torch.randint(0, 10, (12,))
    shift = torch.randn(1, 16, 16) * 0.1
    layers = dict(teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    plain = build_distiller("fkd", teacher, student, options={"teacher_bn": "eval"}, **layers)
    appended = build_distiller("fkd", teacher, student, options={"teacher_bn": "eval"},
                               student_input=lambda b: torch.cat([b, b[:4] + shift]), **layers)
    student.eval()  # BN on running statistics: the extra rows cannot move the clean rows
    with frozen_teacher(teacher, "eval"):
        plain.prepare(x)
        appended.prepare(x)
        appended.connectors.load_state_dict(plain.connectors.state_dict())
        base, _ = plain.loss(x, y)
        total, stats = appended.loss(x, y)
        extra_ce = F.cross_entropy(student(x[:4] + shift), y[:4])
        assert torch.allclose(total, base + extra_ce, atol=1e-5)
        assert stats["train_acc"] <= 12
        too_many = build_distiller("fkd", teacher, student,
                                   student_input=lambda b: b.repeat(3, 1, 1, 1), **layers)
        too_many.prepare(x)
        with pytest.raises(ConfigError, match="at most one row"):
            too_many.loss(x, y)


def test_it_starts_after_the_configured_share_of_the_epochs():
    cfg = robustkd_config({"preset": "student-uap", "perturbation_start": 0.5})
    settings = cfg.perturbation(epochs=4, images=100, batch_size=32)  # 3 batches per epoch
    assert settings.start_batch == 6
    p = OnlinePerturbation(settings, MEAN, STD)
    x = torch.randn(64, 1, 4, 4)
    for _ in range(6):
        assert p(x) is x
    assert not torch.equal(p(x), x) and p.delta is not None
    with pytest.raises(ConfigError, match="perturbation.start"):
        robustkd_config({"perturbation_start": 1.0})
