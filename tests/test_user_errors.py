"""A user's mistakes end in one actionable line and exit 2, not a traceback (tiny digits
runs, the same commands a user types)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from robustkd import api
from robustkd.cli import main

RUN = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=root / "teacher",
              device="cpu", progress=False, eval_every=0)
    api.attack(attack="badnets", teacher=root / "teacher", epochs=1, poison_ratio=0.2,
               out=root / "badnets", device="cpu", progress=False, eval_every=0)
    return root


def copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_damaged_runs_are_one_line_errors(runs, tmp_path, capsys):
    torn = copy_run(runs / "teacher", tmp_path / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run_cli(["evaluate", "--run", str(torn), "--device", "cpu"], capsys)
    assert code == 2 and "damaged or truncated" in err and "Traceback" not in err
    badmeta = copy_run(runs / "teacher", tmp_path / "badmeta")
    (badmeta / "meta.json").write_text("{not json")
    code, err = run_cli(["evaluate", "--run", str(badmeta), "--device", "cpu"], capsys)
    assert code == 2 and "meta.json is not valid JSON" in err
    wrong = copy_run(runs / "teacher", tmp_path / "wrong")
    meta = json.loads((wrong / "meta.json").read_text())
    meta["arch"] = "wrn10_2"
    (wrong / "meta.json").write_text(json.dumps(meta))
    code, err = run_cli(["evaluate", "--run", str(wrong), "--device", "cpu"], capsys)
    assert code == 2 and "weights do not fit wrn10_2" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_one_line_error(runs, capsys):
    code, err = run_cli(["evaluate", "--run", str(runs / "teacher"), "--device",
                         "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err


def test_partial_teacher_is_refused_unless_asked_and_then_recorded(runs, tmp_path, capsys):
    partial = copy_run(runs / "teacher", tmp_path / "partial")
    meta = json.loads((partial / "meta.json").read_text())
    meta.pop("complete")
    meta["epochs_done"] = 1
    (partial / "meta.json").write_text(json.dumps(meta))
    argv = ["attack", "--attack", "badnets", "--teacher", str(partial), "--epochs", "1",
            "--out", str(tmp_path / "bd"), *RUN]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "unfinished run (1 epochs done" in err and "--allow-partial" in err
    assert not (tmp_path / "bd").exists()
    assert main([*argv, "--allow-partial"]) == 0
    assert json.loads((tmp_path / "bd" / "record.json").read_text())["config"]["allow_partial"]
    assert main(["evaluate", "--run", str(partial), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev" / "record.json").read_text())["unfinished"] is True


def test_student_evaluation_uses_its_teachers_trigger(runs, tmp_path):
    api.distill(teacher=runs / "badnets", student="wrn10_1", epochs=1, clean_fraction=0.2,
                out=tmp_path / "s", device="cpu", progress=False, eval_every=0)
    rec = api.evaluate(model_dir=tmp_path / "s", device="cpu")
    assert "asr" in rec["metrics"] and rec["trigger_from"] == str(runs / "badnets")


def test_records_carry_versions_and_are_readable_by_others(runs):
    rec = json.loads((runs / "teacher" / "record.json").read_text())
    assert {"torch", "python", "platform", "robustkd"} <= set(rec["versions"])
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((runs / "teacher" / "record.json").stat().st_mode)
    assert mode == 0o666 & ~umask


def test_report_of_a_missing_folder_and_listing_models(tmp_path, capsys):
    code, err = run_cli(["report", "--out", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "holds no records.jsonl" in err
    assert not (tmp_path / "nothing").exists()
    assert main(["models", "--json"]) == 0
    assert "wrn10_1" in capsys.readouterr().out


def test_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "(default 200)" in out and "examples:" in out and "robustkd distill" in out


def test_a_factory_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from robustkd.models import build_model\n"
        "def make(num_classes):\n    return build_model('wrn10_1', num_classes=num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    net = api.load_factory("mynets:make", 10, 3)
    assert isinstance(net, torch.nn.Module)


def test_a_dataset_folder_without_its_splits_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "foo" / "train").mkdir(parents=True)
    code, err = run_cli(["train", "--dataset", "foo", "--data-root", str(tmp_path),
                         "--out", str(tmp_path / "o"), "--epochs", "1"], capsys)
    assert code == 2 and "exists but has no test/ folder" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, shown", [
    (["train", "--lr", "nan"], "lr (--lr) must be a finite number"),
    (["train", "--epochs", "0"], "epochs (--epochs) must be >= 1"),
    (["attack", "--attack", "blended", "--blended-alpha", "3"],
     "alpha (--blended-alpha) must be <= 1.0"),
    (["distill", "--teacher", "T", "--fkd-beta", "-1"], "beta (--fkd-beta) must be >= 0.0"),
    (["distill", "--teacher", "T", "--defense", "anp", "--anp-threshold", "-1"],
     "threshold (--anp-threshold) must be >= 0.0"),
])
def test_a_bad_value_names_the_flag_that_set_it(argv, shown, tmp_path, capsys):
    code, err = run_cli([*argv, "--device", "cpu", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and shown in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
