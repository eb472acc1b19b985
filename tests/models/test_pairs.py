"""The paper's teacher -> student pairs (Table 2): registry, one FKD step each, CLI --pair."""

from __future__ import annotations

import json

import pytest
import torch

from robustkd import api
from robustkd.cli import main
from robustkd.distill import build_distiller
from robustkd.errors import ConfigError
from robustkd.io import META_FILE
from robustkd.models import build_model
from robustkd.models.layers import frozen_teacher
from robustkd.models.pairs import (
    PAIRS,
    check_teacher,
    get_pair,
    list_pairs,
    same_architecture,
)
from robustkd.models.taps import tap

TABLE2 = {
    "wrn28_4-wrn16_4": ("wrn28_4", "wrn16_4"),
    "wrn28_4-wrn28_2": ("wrn28_4", "wrn28_2"),
    "wrn28_4-wrn16_2": ("wrn28_4", "wrn16_2"),
    "wrn28_4-resnet56": ("wrn28_4", "resnet56"),
    "pyramidnet200-wrn28_4": ("pyramidnet200", "wrn28_4"),
    "pyramidnet200-pyramidnet110": ("pyramidnet200", "pyramidnet110"),
}
CLASSES = {"wrn28_4": 100, "pyramidnet200": 100, "imagenet_resnet50": 10}  # CIFAR-100 / -10


@pytest.fixture(scope="module")
def teachers():
    """Each teacher built once per module (PyramidNet-200 alone has 26.8M parameters)."""
    torch.manual_seed(0)
    return {name: build_model(name, num_classes=n) for name, n in CLASSES.items()}


def test_table2_pairs_are_registered():
    assert list_pairs(paper_only=True) == list(TABLE2)
    for name, (teacher, student) in TABLE2.items():
        pair = get_pair(name)
        assert (pair.teacher, pair.student) == (teacher, student) and pair.in_paper
        assert "cifar100" in pair.datasets
    assert get_pair("WRN28_4->WRN16_2") is PAIRS["wrn28_4-wrn16_2"]
    with pytest.raises(ConfigError, match="known pairs: wrn28_4-wrn16_4"):
        get_pair("wrn28_4-vgg16")


def _one_fkd_step(teacher, student_name: str, size: int = 32):
    n = teacher.arch_kwargs["num_classes"]
    torch.manual_seed(1)
    student = build_model(student_name, num_classes=n)
    d = build_distiller("fkd", teacher, student)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, n - 1])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with frozen_teacher(teacher, d.teacher_mode()):
        d.prepare(x)
        loss, stats = d.loss(x, y)
        loss.backward()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"
    return d, student, x, loss, stats


@pytest.mark.parametrize("name", [n for n in PAIRS if n not in ("pyramidnet200-wrn28_4",
                                                                 "pyramidnet200-pyramidnet110")])
def test_pair_distils_one_fkd_step(name, teachers):
    _check_pair(name, teachers)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pyramidnet200-wrn28_4", "pyramidnet200-pyramidnet110"])
def test_pyramidnet200_pair_distils_one_fkd_step(name, teachers):
    _check_pair(name, teachers)


def _check_pair(name: str, teachers) -> None:
    pair = get_pair(name)
    teacher = teachers[pair.teacher]
    d, student, x, loss, stats = _one_fkd_step(teacher, pair.student)
    assert torch.isfinite(loss) and stats["feat_loss"] > 0
    t_layers, s_layers = d.setup.teacher_layers, d.setup.student_layers
    assert len(t_layers) == len(s_layers) == (4 if pair.teacher.startswith("imagenet") else 3)
    # connectors map the student's channels to the teacher's, stage by stage
    with torch.no_grad(), tap(teacher, [t.prerelu for t in t_layers]) as tt, \
            tap(student, [s.prerelu for s in s_layers]) as st:
        teacher.eval()(x)
        student.eval()(x)
    for conn, t, s in zip(d.connectors, t_layers, s_layers, strict=True):
        tf, sf = tt[t.prerelu], st[s.prerelu]
        assert tf.shape[2:] == sf.shape[2:], f"{t.prerelu} vs {s.prerelu}: resolutions differ"
        assert conn[0].weight.shape == (tf.shape[1], sf.shape[1], 1, 1)
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert student.get_submodule(student.classifier_name).weight.grad is not None


def test_stage_count_mismatch_is_a_clear_error_and_naming_layers_fixes_it():
    torch.manual_seed(0)
    teacher = build_model("imagenet_resnet18", num_classes=10, small_input=True)
    student = build_model("wrn16_2", num_classes=10)
    with pytest.raises(ConfigError, match=r"teacher has 4 .*student 3.*--teacher-layers"):
        build_distiller("fkd", teacher, student)
    d = build_distiller("fkd", teacher, student,
                        teacher_layers=[f"layer{i}.1.preact" for i in (1, 2, 3)],
                        student_layers=[s.prerelu for s in student.distill_layers()])
    x = torch.randn(2, 3, 32, 32)
    with frozen_teacher(teacher, "train"):
        d.prepare(x)
        loss, _ = d.loss(x, torch.tensor([1, 2]))
    assert torch.isfinite(loss)
    assert [c[0].weight.shape[:2] for c in d.connectors] == [(64, 32), (128, 64), (256, 128)]


@pytest.mark.slow
def test_teacher_check_matches_by_structure():
    assert same_architecture("wrn28_4", {"num_classes": 100}, "wrn28_4")
    spelled_out = {"num_classes": 100, "in_channels": 3, "depth": 200, "alpha": 240,
                   "bottleneck": True}
    assert same_architecture("pyramidnet", spelled_out, "pyramidnet200")
    assert not same_architecture("pyramidnet", {**spelled_out, "alpha": 84}, "pyramidnet200")
    assert not same_architecture("wrn16_2", {"num_classes": 100}, "wrn28_4")
    check_teacher(get_pair("pyramidnet200-wrn28_4"), "pyramidnet", spelled_out)
    with pytest.raises(ConfigError, match="needs a wrn28_4 teacher.*is wrn16_4; no pair"):
        check_teacher(get_pair("wrn28_4-wrn16_2"), "wrn16_4", {"num_classes": 100})
    with pytest.raises(ConfigError, match="pairs with that teacher: pyramidnet200-wrn28_4"):
        check_teacher(get_pair("wrn28_4-wrn16_2"), "pyramidnet200", {"num_classes": 100})


def _fake_run(folder, arch: str, **kwargs) -> str:
    folder.mkdir()
    meta = {"arch": arch, "arch_kwargs": {"num_classes": 100, "in_channels": 3, **kwargs}}
    (folder / META_FILE).write_text(json.dumps(meta))
    return str(folder)


def test_cli_pair_sets_student_and_checks_teacher(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(api, "distill", lambda **kw: calls.append(kw) or {})
    good = _fake_run(tmp_path / "t28", "wrn28_4", dropout=0.0)
    out = str(tmp_path / "s")
    assert main(["distill", "--teacher", good, "--pair", "wrn28_4-resnet56", "--out", out]) == 0
    assert calls[-1]["student"] == "resnet56" and calls[-1]["student_factory"] is None

    bad = _fake_run(tmp_path / "t16", "wrn16_2", dropout=0.0)
    assert main(["distill", "--teacher", bad, "--pair", "wrn28_4-resnet56", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "needs a wrn28_4 teacher" in err and "t16" in err and "--student" in err
    assert main(["distill", "--teacher", good, "--pair", "wrn28_4-vgg", "--out", out]) == 2
    assert "known pairs" in capsys.readouterr().err
    assert main(["distill", "--teacher-factory", "m:f", "--teacher-weights", "w.safetensors",
                 "--pair", "wrn28_4-resnet56", "--out", out]) == 2
    assert "--student resnet56" in capsys.readouterr().err
    assert main(["distill", "--teacher", good, "--pair", "wrn28_4-resnet56", "--student",
                 "wrn16_2", "--out", out]) == 2  # --pair names the student itself
    assert "--pair sets the student" in capsys.readouterr().err
    assert len(calls) == 1
