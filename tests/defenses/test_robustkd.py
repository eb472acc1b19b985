"""RobustKD through the CLI on tiny models: records, saved masks, threshold selection."""

import json

import pytest
from safetensors.torch import load_file

from robustkd.attacks import patch_trigger
from robustkd.cli import main
from robustkd.defenses.detox import DetoxMasks
from robustkd.defenses.robustkd import select_blind, select_oracle
from robustkd.runs import run_meta, save_run_model


def test_blind_rule_prefers_lowest_variance_within_accuracy_bound():
    base = {"acc": 0.90, "variance": 1.0}
    cands = [{"tau": 0.1, "val_acc": 0.90, "val_variance": 0.8},
             {"tau": 0.5, "val_acc": 0.89, "val_variance": 0.5},
             {"tau": 1.0, "val_acc": 0.70, "val_variance": 0.1}]
    assert select_blind(cands, base, epsilon=0.02)["tau"] == 0.5
    assert select_blind(cands, base, epsilon=0.25)["tau"] == 1.0
    assert select_blind(cands[2:], base, epsilon=0.01)["tau"] == 1.0  # nothing qualifies


def test_oracle_rule_is_algorithm_one():
    cands = [{"tau": 0.1, "student_acc": 0.80, "student_asr": 0.5},
             {"tau": 0.2, "student_acc": 0.79, "student_asr": 0.1},
             {"tau": 0.5, "student_acc": 0.60, "student_asr": 0.0}]
    assert select_oracle(cands, acc0=0.81, epsilon=0.03)["tau"] == 0.2


@pytest.fixture
def teacher_dirs(tmp_path, digits_teacher, digits):
    clean = tmp_path / "teacher"
    save_run_model(clean, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    trig = patch_trigger(digits.train.image_size, 1, size=3)
    bd = tmp_path / "bd"
    save_run_model(bd, digits_teacher, run_meta(digits_teacher, digits, None, 0, trigger=trig,
                                                target=0), trig)
    return clean, bd


# the paper's literal configuration: these tests exercise masks and tau selection
COMMON = ["--student", "wrn10_1", "--epochs", "1", "--robustkd-detox-epochs", "1",
          "--clean-fraction", "0.3", "--device", "cpu", "--no-progress", "--lr", "0.05",
          "--robustkd-preset", "paper"]


def test_robustkd_fixed_tau_writes_masks_and_record(tmp_path, teacher_dirs):
    _, bd = teacher_dirs
    out = tmp_path / "rk"
    assert main(["distill", "--method", "robustkd", "--teacher", str(bd), "--robustkd-tau", "0.3",
                 "--out", str(out), *COMMON]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["selection"] == "fixed" and rec["chosen_tau"] == 0.3
    assert rec["detox_seconds"] > 0 and rec["distill_seconds"] > 0
    assert "asr" in rec["metrics"] and "asr" in rec["robustkd"]["detoxified_teacher_metrics"]
    meta = json.loads((out / "detox.json").read_text())
    masks = DetoxMasks.from_saved(meta, load_file(str(out / "detox.safetensors")))
    assert masks.names == ["block1", "block2", "block3"]
    assert all(float(m.detach().max()) <= 0.3 + 1e-6 for m in masks.masks)


@pytest.mark.slow
def test_robustkd_blind_and_oracle_selection(tmp_path, teacher_dirs, capsys):
    clean, bd = teacher_dirs
    out = tmp_path / "blind"
    assert main(["distill", "--method", "robustkd", "--teacher", str(bd),
                 "--robustkd-taus", "0.1,0.6", "--robustkd-selection", "blind",
                 "--out", str(out), *COMMON]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["selection"] == "blind" and rec["chosen_tau"] in (0.1, 0.6)
    assert len(rec["robustkd"]["candidates"]) == 2
    assert main(["distill", "--method", "robustkd", "--teacher", str(clean), "--robustkd-taus",
                 "0.1,0.6", "--robustkd-selection", "oracle", "--out", str(tmp_path / "o1"),
                 *COMMON]) == 2
    assert "needs the teacher's trigger" in capsys.readouterr().err
    out = tmp_path / "oracle"
    assert main(["distill", "--method", "robustkd", "--teacher", str(bd),
                 "--robustkd-taus", "0.1,0.6", "--robustkd-selection", "oracle",
                 "--robustkd-layers", "last", "--out", str(out), *COMMON]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["selection"] == "oracle" and rec["robustkd"]["layers"] == ["block3"]
    assert {c["tau"] for c in rec["robustkd"]["candidates"]} == {0.1, 0.6}


def test_detox_flags_rejected_for_other_methods(tmp_path, teacher_dirs, capsys):
    clean, _ = teacher_dirs
    assert main(["distill", "--method", "fkd", "--teacher", str(clean), "--robustkd-tau", "0.1",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--robustkd-tau applies to --method robustkd, not fkd" in capsys.readouterr().err


@pytest.mark.slow
def test_oracle_candidates_differ_only_in_tau(tmp_path, teacher_dirs):
    # the same tau twice: same masks, same student initialisation, same data order, so the
    # two candidate students must score identically (tau is the only thing compared)
    _, bd = teacher_dirs
    out = tmp_path / "same"
    assert main(["distill", "--method", "robustkd", "--teacher", str(bd),
                 "--robustkd-taus", "0.3,0.3", "--robustkd-selection", "oracle",
                 "--out", str(out), *COMMON]) == 0
    first, second = json.loads((out / "record.json").read_text())["robustkd"]["candidates"]
    assert first == second
