"""Distillation methods end to end on tiny models and the embedded digits data."""

import json
from contextlib import closing

import pytest
import torch
from safetensors.torch import save_file

from robustkd.cli import main
from robustkd.distill import DistillRun, build_distiller, distill_student
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import accuracy
from robustkd.models import build_model
from robustkd.models.layers import frozen_teacher
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig
from tests.toy_models import TinyNet


@pytest.fixture
def teacher(digits_teacher):
    return digits_teacher


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fkd", "kd", "ce"])
def test_student_learns_and_teacher_is_untouched(method, digits, teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = build_model("wrn10_1", num_classes=10, in_channels=1)
    history, distiller = distill_student(
        teacher, student, digits.train, digits.test, method=method,
        loop=LoopSettings(mean=digits.mean, std=digits.std, augment=digits.augment,
                          batch_size=64, progress=False),
        run=DistillRun(epochs=4, optim=OptimConfig(lr=0.05, schedule="cosine")))
    assert history[-1].loss < history[0].loss
    assert history[-1].extra["test_acc"] > 0.7  # chance is 0.1
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed during {method}"
    if method == "fkd":
        assert len(distiller.connectors) == 3
        assert history[-1].stats["feat_loss"] > 0
    # the run's hooks were registered once and are gone with it
    assert not distiller._taps
    for model in (teacher, student):
        assert all(not m._forward_hooks for m in model.modules())


def test_fkd_margins_come_from_teacher_bn(digits, teacher):
    student = build_model("wrn10_1", num_classes=10, in_channels=1)
    d = build_distiller("fkd", teacher, student)
    x = torch.randn(4, 1, 16, 16)
    with frozen_teacher(teacher, "train"):
        d.prepare(x)
    from robustkd.distill.losses import bn_margin

    assert torch.allclose(d.margins()[-1], bn_margin(teacher.bn1.weight, teacher.bn1.bias))
    assert len(d.margins()) == 3 and all((m <= 0).all() for m in d.margins())


def test_fkd_on_user_models_with_named_layers(digits):
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    d = build_distiller("fkd", teacher, student, teacher_layers=["bn1", "bn2"],
                        student_layers=["bn1", "bn2"])
    assert [layer.bn for layer in d.setup.teacher_layers] == ["bn1", "bn2"]
    with frozen_teacher(teacher, "train"):
        d.prepare(torch.randn(4, 1, 16, 16))
    assert d.connectors[0][0].weight.shape == (16, 8, 1, 1)
    # conv outputs have no BN of their own: margins are measured on the probe batch
    d2 = build_distiller("fkd", teacher, student, teacher_layers=["conv1", "conv2"],
                         student_layers=["conv1", "conv2"])
    with frozen_teacher(teacher, "eval"):
        d2.prepare(torch.randn(8, 1, 16, 16))
    assert all((m <= 0).all() for m in d2.margins())


def test_fkd_spatial_mismatch_is_a_clear_error():
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    d = build_distiller("fkd", teacher, student, teacher_layers=["bn1", "bn2"],
                        student_layers=["bn2", "bn1"])
    with pytest.raises(ConfigError, match="spatial=pool"), frozen_teacher(teacher, "train"):
        d.prepare(torch.randn(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="pairs layers one to one"):
        build_distiller("fkd", teacher, student, teacher_layers=["bn1"],
                        student_layers=["bn1", "bn2"])
    with pytest.raises(ConfigError, match="has no setting"):
        build_distiller("kd", teacher, student, options={"beta": 2.0})


def test_cli_distill_with_factory_teacher_and_pickle_guard(tmp_path, capsys, digits):
    torch.manual_seed(0)
    net = TinyNet(width=16)
    save_file(net.state_dict(), str(tmp_path / "t.safetensors"))
    torch.save(net.state_dict(), tmp_path / "t.pt")
    base = ["distill", "--method", "fkd", "--teacher-factory", "tests.toy_models:make_wide",
            "--teacher-layers", "bn1,bn2", "--student-factory", "tests.toy_models:make",
            "--student-layers", "bn1,bn2", "--dataset", "digits", "--epochs", "1",
            "--clean-fraction", "0.3", "--device", "cpu", "--no-progress"]
    assert main([*base, "--teacher-weights", str(tmp_path / "t.pt"),
                 "--out", str(tmp_path / "s0")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*base, "--teacher-weights", str(tmp_path / "t.safetensors"),
                 "--out", str(tmp_path / "s1")]) == 0
    rec = json.loads((tmp_path / "s1" / "record.json").read_text())
    assert 0 <= rec["metrics"]["acc"] <= 1 and rec["clean_images"] < len(digits.train) / 2
    assert main([*base, "--teacher-weights", str(tmp_path / "t.safetensors"),
                 "--kd-temperature", "3", "--out", str(tmp_path / "s2")]) == 2
    assert "--kd-temperature applies to --method kd, not fkd" in capsys.readouterr().err


def test_cli_teacher_with_wrong_class_count(tmp_path, capsys):
    net = TinyNet(num_classes=7)
    save_file(net.state_dict(), str(tmp_path / "t.safetensors"))

    assert main(["distill", "--teacher-factory", "tests.toy_models:make", "--teacher-weights",
                 str(tmp_path / "t.safetensors"), "--dataset", "digits", "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the teacher" in err


def test_accuracy_helper_on_untrained_model(digits):
    net = TinyNet()
    assert 0.0 <= accuracy(net, digits.test, digits.mean, digits.std) <= 1.0


@pytest.mark.slow
def test_compiled_distillation_loss_matches_eager(digits):
    """``--compile``: the taps are registered once, so the FKD loss compiles to one graph
    that gives the eager loss and gradients."""
    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    distiller = build_distiller("fkd", teacher, student, teacher_layers=["bn1", "bn2"],
                                student_layers=["bn1", "bn2"])
    x = (digits.train.images[:32].float() / 255 - 0.5) / 0.25
    y = digits.train.labels[:32]
    with frozen_teacher(teacher, distiller.teacher_mode()), closing(distiller):
        distiller.prepare(x)

        def loss_and_grads(loss_fn):
            student.zero_grad()
            loss, _ = loss_fn(x, y)
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in student.parameters()]

        eager, eager_grads = loss_and_grads(distiller.loss)
        compiled, compiled_grads = loss_and_grads(torch.compile(distiller.loss))
        assert len(distiller._taps) == 2  # one per model, reused by the compiled graph
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_distill_student_runs_compiled(digits):
    """``LoopSettings(compile=True)``: the whole loop with the compiled loss trains."""
    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    small = digits.train.subset(torch.arange(0, 256))
    history, distiller = distill_student(
        teacher, student, small, None, teacher_layers=["bn1", "bn2"],
        student_layers=["bn1", "bn2"],
        loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=64, progress=False,
                          compile=True),
        run=DistillRun(epochs=2, optim=OptimConfig(lr=0.05)))
    assert len(history) == 2 and history[-1].loss < history[0].loss
    assert not distiller._taps  # hooks removed after the run, compiled or not


def test_fkd_feature_share_matches_features_first_then_learns_from_logits(digits):
    """``feature_share`` 0.5: the first half of the run's steps is FKD's loss, the rest is
    KD's, and the step count survives in the distiller's state (resume)."""
    from robustkd.distill.kd import KDSettings
    from robustkd.distill.losses import kd_loss

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    train = digits.train.subset(torch.arange(128))
    _, d = distill_student(
        teacher, student, train, None, teacher_layers=["bn1", "bn2"],
        student_layers=["bn1", "bn2"], options={"feature_share": 0.5},
        loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=32, progress=False,
                          amp=False),
        run=DistillRun(epochs=2, optim=OptimConfig(lr=0.05)))
    assert d.total_steps == 8 and int(d.steps_done) == 8
    assert "steps_done" in d.state_dict()
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    student.eval()
    def resume_at(step: int) -> None:  # as a resumed run loads its state
        d.load_state_dict({**d.state_dict(), "steps_done": torch.tensor(step)})

    with frozen_teacher(teacher, "train"), closing(d):
        resume_at(0)  # step 0 of 8: features
        first, stats = d.loss(x, y)
        assert stats["feat_loss"] > 0
        resume_at(4)  # step 4 of 8: the logit phase, exactly KD's loss
        late, stats = d.loss(x, y)
        kd = KDSettings()
        with torch.no_grad():
            expected = kd_loss(student(x), teacher(x), y, kd.temperature, kd.alpha)
        assert float(stats["feat_loss"]) == 0.0
        assert late.item() == pytest.approx(expected.item(), rel=1e-5)
        assert int(d.steps_done) == 5
    with pytest.raises(ConfigError, match="feature_share"):
        build_distiller("fkd", teacher, student, teacher_layers=["bn1"],
                        student_layers=["bn1"], options={"feature_share": 0.0})


def test_fkd_logit_term_reads_the_logit_teacher(digits):
    """``logit_weight`` adds KD's soft-target term to FKD's loss; with a ``logit_teacher``
    the term reads that model (in eval mode), not the feature teacher."""
    from robustkd.distill.kd import KDSettings
    from robustkd.distill.losses import soft_target_loss

    torch.manual_seed(0)
    teacher, other, student = TinyNet(width=16), TinyNet(width=16), TinyNet(width=8)
    x = (digits.train.images[:32].float() / 255 - 0.5) / 0.25
    y = digits.train.labels[:32]
    layers = {"teacher_layers": ["bn1", "bn2"], "student_layers": ["bn1", "bn2"]}
    plain = build_distiller("fkd", teacher, student, **layers)
    own = build_distiller("fkd", teacher, student, options={"logit_weight": 0.5}, **layers)
    read_other = build_distiller("fkd", teacher, student, options={"logit_weight": 0.5},
                                 logit_teacher=other, **layers)
    temperature = KDSettings().temperature
    student.eval()  # the same student output for every loss
    with frozen_teacher(teacher, "train"), frozen_teacher(other, "eval"):
        for d in (plain, own, read_other):
            d.prepare(x)
            d.load_state_dict(plain.state_dict())  # the same connectors
        base, _ = plain.loss(x, y)
        with torch.no_grad():
            s_logits, t_logits, o_logits = student(x), teacher(x), other(x)
        mine, _ = own.loss(x, y)
        theirs, _ = read_other.loss(x, y)
    for d in (plain, own, read_other):
        d.close()
    expected_own = base + 0.5 * soft_target_loss(s_logits, t_logits, temperature)
    expected_other = base + 0.5 * soft_target_loss(s_logits, o_logits, temperature)
    assert mine.item() == pytest.approx(expected_own.item(), rel=1e-5)
    assert theirs.item() == pytest.approx(expected_other.item(), rel=1e-5)
    assert abs(theirs.item() - mine.item()) > 1e-3  # a different model's logits
    with pytest.raises(ConfigError, match="logit_weight"):
        build_distiller("fkd", teacher, student, options={"logit_weight": -1.0}, **layers)


def test_kd_reads_the_logit_teacher_when_one_is_given(digits):
    """Every logit term reads ``logit_teacher``: Hinton KD's loss is KD against that model's
    logits (in eval mode), not the teacher's."""
    from robustkd.distill.kd import KDSettings
    from robustkd.distill.losses import kd_loss

    torch.manual_seed(0)
    teacher, other, student = TinyNet(width=16), TinyNet(width=16), TinyNet(width=8)
    x = (digits.train.images[:32].float() / 255 - 0.5) / 0.25
    y = digits.train.labels[:32]
    d = build_distiller("kd", teacher, student, logit_teacher=other)
    student.eval()
    kd = KDSettings()
    with frozen_teacher(teacher, "eval"), frozen_teacher(other, "eval"), closing(d):
        loss, _ = d.loss(x, y)
        with torch.no_grad():
            expected = kd_loss(student(x), other(x), y, kd.temperature, kd.alpha)
            from_teacher = kd_loss(student(x), teacher(x), y, kd.temperature, kd.alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - from_teacher.item()) > 1e-3


def test_fkd_skip_deepest_is_fkd_on_every_layer_but_the_deepest(digits, teacher):
    """``skip_deepest`` leaves the last distillation layer out: the same loss as FKD given
    only the other layers, and a different one from FKD on all of them."""
    student = build_model("wrn10_1", num_classes=10, in_channels=1)
    x = (digits.train.images[:32].float() / 255 - digits.mean[0]) / digits.std[0]
    y = digits.train.labels[:32]
    every = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
    skipped = build_distiller("fkd", teacher, student, options={"skip_deepest": True})
    named = build_distiller("fkd", teacher, student, teacher_layers=every[:2],
                            student_layers=every[:2])
    full = build_distiller("fkd", teacher, student)
    assert skipped.t_names == every[:2] == skipped.s_names and full.t_names == every
    student.eval()
    with frozen_teacher(teacher, "train"):
        for d in (skipped, named, full):
            torch.manual_seed(0)  # the same connectors for the shared layers
            d.prepare(x)
        losses = [d.loss(x, y)[0].item() for d in (skipped, named, full)]
    for d in (skipped, named, full):
        d.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert abs(losses[2] - losses[0]) > 1e-3
    with pytest.raises(ConfigError, match="at least two distillation layers"):
        build_distiller("fkd", teacher, student, teacher_layers=["bn1"], student_layers=["bn1"],
                        options={"skip_deepest": True})


def test_mixup_blends_the_batch_with_a_permutation_of_itself():
    """``mixup``: ``lam * x + (1 - lam) * x[perm]`` with one Beta draw per batch, the layout
    kept; the partners' labels follow the permutation."""
    from robustkd.distill.fkd import mixup

    x = torch.randn(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8)
    torch.manual_seed(3)
    mixed, partner, lam = mixup(x, y, 1.0)
    torch.manual_seed(3)
    lam_again = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(8)
    assert lam == lam_again and 0.0 < lam < 1.0
    assert torch.equal(partner, y[perm]) and not torch.equal(perm, y)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)
    assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_mixed_cross_entropy_blends_the_two_labels():
    from robustkd.distill.fkd import mixed_cross_entropy

    torch.manual_seed(0)
    logits, y, y2 = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor(
        [3, 2, 1, 0, 3, 2])
    ce = torch.nn.functional.cross_entropy
    assert mixed_cross_entropy(logits, y, None, 0.3).item() == pytest.approx(
        ce(logits, y).item())
    assert mixed_cross_entropy(logits, y, y2, 0.3).item() == pytest.approx(
        0.3 * ce(logits, y).item() + 0.7 * ce(logits, y2).item(), rel=1e-6)


def test_fkd_with_mixup_asks_the_teacher_about_the_blended_batch(digits):
    """With ``mixup`` the teacher and the student see the same blend and the CE reads both
    labels; without it FKD draws no random numbers (runs without it are unchanged)."""
    from robustkd.distill.fkd import mixed_cross_entropy

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    x = (digits.train.images[:32].float() / 255 - 0.5) / 0.25
    y = digits.train.labels[:32]
    layers = {"teacher_layers": ["bn1", "bn2"], "student_layers": ["bn1", "bn2"]}
    plain = build_distiller("fkd", teacher, student, **layers)
    mixed = build_distiller("fkd", teacher, student, options={"mixup": 0.4}, **layers)
    seen = []
    hook = teacher.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    student.eval()
    with frozen_teacher(teacher, "train"):
        for d in (plain, mixed):
            d.prepare(x)
            d.load_state_dict(plain.state_dict())
        seen.clear()
        torch.manual_seed(5)
        state = torch.get_rng_state()
        base, _ = plain.loss(x, y)
        assert torch.equal(torch.get_rng_state(), state) and torch.equal(seen[-1], x)
        torch.manual_seed(5)
        loss, _ = mixed.loss(x, y)
        torch.manual_seed(5)
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())
        perm = torch.randperm(32)
        blend = x.lerp(x[perm], 1.0 - lam)
        assert torch.allclose(seen[-1], blend)
        expected, _ = plain.loss(blend, y)  # FKD on the blend, its CE on the first label ...
        with torch.no_grad():
            logits = student(blend)
        expected = (expected - torch.nn.functional.cross_entropy(logits, y)
                    + mixed_cross_entropy(logits, y, y[perm], lam))  # ... then on both
    hook.remove()
    for d in (plain, mixed):
        d.close()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - base.item()) > 1e-3
    with pytest.raises(ConfigError, match="mixup"):
        build_distiller("fkd", teacher, student, options={"mixup": -0.5}, **layers)
