"""Nothing of a user's is overwritten, and mistakes about --out surface before any compute."""

from __future__ import annotations

import json
import math

import pytest

from robustkd import api
from robustkd.cli import main
from robustkd.errors import ConfigError, TrainingError
from robustkd.io import read_json, write_json
from robustkd.outputs import prepare_out, run_state, write_job
from tests.run_dirs import as_if_killed

TINY = {"dataset": "digits", "model": "wrn10_1", "epochs": 1, "device": "cpu",
        "progress": False, "eval_every": 0}


def test_states_of_a_run_directory(tmp_path):
    assert run_state(tmp_path) == "empty"
    (tmp_path / "node.json").write_text("{}")  # a harness's bookkeeping is not a run
    assert run_state(tmp_path) == "empty"
    (tmp_path / "meta.json").write_text(json.dumps({"epochs_done": 2}))
    assert run_state(tmp_path) == "unfinished"
    (tmp_path / "meta.json").write_text(json.dumps({"complete": True}))
    assert run_state(tmp_path) == "finished"


def test_a_finished_run_is_never_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "teacher"
    api.train(out=out, **TINY)
    before = (out / "model.safetensors").read_bytes()
    argv = ["train", "--dataset", "digits", "--model", "wrn10_1", "--epochs", "1", "--out",
            str(out), "--device", "cpu", "--no-progress", "--lr", "0.3"]
    assert main(argv) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["attack", "--attack", "badnets", "--teacher", str(out), "--out", str(out),
                 "--epochs", "1", "--device", "cpu"]) == 2
    assert "is the --teacher run this command reads" in capsys.readouterr().err
    assert read_json(out / "meta.json")["role"] == "clean"
    assert main([*argv, "--overwrite"]) == 0  # said explicitly: replaced
    assert read_json(out / "record.json")["config"]["lr"] == 0.3


def test_unfinished_runs_need_resume_and_bad_outs_fail_first(tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "meta.json").write_text(json.dumps({"epochs_done": 1}))
    with pytest.raises(ConfigError, match="unfinished run: --resume continues it"):
        prepare_out(partial)
    assert prepare_out(partial, resume=True) == partial
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        api.train(out=afile, **TINY)


def test_a_diverging_loss_stops_training_without_marking_it_complete(tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became nan in epoch 1"):
        api.train(out=out, lr=1e30, **{**TINY, "epochs": 2})
    assert run_state(out) != "finished"


def test_records_are_strict_json(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": math.nan, "b": [1.0, math.inf], "c": 2.0})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": 2.0}
    assert "NaN" not in path.read_text()


def test_resume_refuses_settings_the_earlier_epochs_did_not_use(tmp_path):
    out = tmp_path / "run"
    prepare_out(out, job={"lr": 0.1, "model": "wrn16_1", "device": "cpu"})
    assert not out.exists()  # nothing is written before the inputs have loaded
    write_job(out, {"lr": 0.1, "model": "wrn16_1", "device": "cpu"})
    (out / "meta.json").write_text(json.dumps({"epochs_done": 2}))  # interrupted
    with pytest.raises(ConfigError, match=r"differ: lr 0.1 -> 0.5; model 'wrn16_1' -> "
                                          r"'wrn16_2'"):
        prepare_out(out, resume=True, job={"lr": 0.5, "model": "wrn16_2", "device": "cpu"})
    # where and how it runs may change
    prepare_out(out, resume=True, job={"lr": 0.1, "model": "wrn16_1", "device": "cuda"})


@pytest.mark.slow
def test_an_interrupted_attack_resumes_with_its_resolved_defaults(tmp_path):
    api.train(out=tmp_path / "t", **TINY)
    kw = {"attack": "badnets", "teacher": tmp_path / "t", "out": tmp_path / "bd",
          "device": "cpu", "progress": False, "eval_every": 0, "epochs": 2}
    api.attack(**kw)
    as_if_killed(tmp_path / "bd")
    again = api.attack(**kw, resume=True)  # lr/schedule left to their defaults both times
    assert again["config"]["lr"] == 0.008 and again["config"]["schedule"] == "constant"
    with pytest.raises(ConfigError, match="poison_ratio 0.02 -> 0.5"):
        as_if_killed(tmp_path / "bd")
        api.attack(**kw, resume=True, poison_ratio=0.5)


def test_a_completed_run_keeps_no_resume_state(tmp_path):
    api.train(out=tmp_path / "t", **TINY)
    assert not (tmp_path / "t" / "state").exists()
    assert (tmp_path / "t" / "job.json").exists()


def test_a_resumed_run_reports_its_total_time(tmp_path):
    out = tmp_path / "t"
    api.train(out=out, **{**TINY, "epochs": 2})
    first = read_json(out / "record.json")["seconds"]
    # as if killed after epoch 1 of a run that had spent 1000 s: resume adds up
    as_if_killed(out, epochs_done=2, elapsed_seconds=1000.0)
    again = api.train(out=out, resume=True, **{**TINY, "epochs": 2})
    assert again["seconds"] >= 1000.0 and first < 1000.0
