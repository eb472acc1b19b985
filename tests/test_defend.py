"""``robustkd defend``: a finished model cleaned by a registered defence as a new run; the
parent run is never touched, the result reads like any run, and bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from robustkd import api
from robustkd.cli import main
from robustkd.errors import ConfigError
from robustkd.runs import load_run


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A one-epoch student of a one-epoch digits teacher with a BadNets trigger."""
    root = tmp_path_factory.mktemp("defend")
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=root / "clean", device="cpu",
              progress=False)
    api.attack(attack="badnets", teacher=root / "clean", epochs=1, out=root / "bad",
               device="cpu", progress=False)
    api.distill(teacher=root / "bad", student="wrn10_1", epochs=1, clean_fraction=0.2,
                device="cpu", progress=False, out=root / "student")
    return root / "student"


def test_defend_writes_a_cleaned_run_and_leaves_the_parent(student_run, tmp_path):
    before = {k: v.clone() for k, v in load_file(str(student_run / "model.safetensors")).items()}
    rec = api.defend(run=student_run, defense="anp", options={"iterations": 3},
                     clean_fraction=0.2, device="cpu", progress=False, out=tmp_path / "d")
    assert rec["command"] == "defend" and rec["defense"]["name"] == "anp"
    # the student carries no trigger of its own: ASR is measured with its teacher's
    assert {"acc", "asr"} <= set(rec["metrics"]) and {"acc", "asr"} <= set(rec["parent_metrics"])
    assert rec["parent_seconds"] > 0 and rec["clean_images"] < 1438
    after = load_file(str(student_run / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    loaded = load_run(tmp_path / "d")
    assert loaded.meta["defended"]["defense"] == "anp"
    again = api.evaluate(run=tmp_path / "d", device="cpu")
    assert again["metrics"]["acc"] == pytest.approx(rec["metrics"]["acc"])
    assert again["metrics"]["asr"] == pytest.approx(rec["metrics"]["asr"])


def test_the_cli_takes_the_defences_flags_and_refuses_bad_input(student_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["defend", "--run", str(student_run), "--defense", "finetune",
                 "--finetune-epochs", "1", "--clean-fraction", "0.1", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["defense"]["settings"]["epochs"] == 1
    capsys.readouterr()
    # a finished run is never replaced silently
    assert main(["defend", "--run", str(student_run), "--defense", "finetune",
                 "--finetune-epochs", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a setting is checked where it enters, with its flag's name
    assert main(["defend", "--run", str(student_run), "--anp-iterations", "0",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "iterations" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="unknown teacher defence"):
        api.defend(run=student_run, defense="nope", out=tmp_path / "y", device="cpu")
