"""The CLI contract end to end on the embedded data: train, attack, evaluate, errors."""

import json
from pathlib import Path

import pytest

from robustkd.cli import build_parser, main
from robustkd.training.loop import precision_name


@pytest.mark.parametrize(
    "command", ["train", "attack", "evaluate", "models", "datasets", "demo", "import"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: robustkd " + command in capsys.readouterr().out


def test_train_attack_evaluate_write_records(tmp_path, capsys):
    teacher, bd = tmp_path / "teacher", tmp_path / "badnets"
    common = ["--device", "cpu", "--no-progress", "--batch-size", "64"]
    assert main(["train", "--dataset", "digits", "--model", "wrn10_1", "--epochs", "2",
                 "--lr", "0.05", "--train-fraction", "0.5", "--out", str(teacher),
                 *common]) == 0
    rec = json.loads((teacher / "record.json").read_text())
    assert {"metrics", "config", "seed", "git_rev", "device", "seconds"} <= set(rec)
    assert rec["precision"] == precision_name("cpu", True)  # what the steps ran in
    assert 0.0 <= rec["metrics"]["acc"] <= 1.0 and "asr" not in rec["metrics"]
    assert rec["config"]["train_fraction"] == 0.5
    assert (teacher / "model.safetensors").exists() and (teacher / "meta.json").exists()

    assert main(["attack", "--attack", "badnets", "--teacher", str(teacher), "--epochs", "1",
                 "--poison-ratio", "0.1", "--badnets-patch-size", "2", "--out", str(bd),
                 *common]) == 0
    rec = json.loads((bd / "record.json").read_text())
    assert 0.0 <= rec["metrics"]["asr"] <= 1.0
    meta = json.loads((bd / "meta.json").read_text())
    assert meta["trigger"]["kind"] == "patch" and meta["trigger"]["target"] == 0
    assert meta["trigger"]["params"]["size"] == 2

    assert main(["evaluate", "--run", str(bd), "--feature-samples", "8",
                 "--device", "cpu"]) == 0
    ev = json.loads((bd / "evaluation" / "record.json").read_text())
    assert ev["metrics"]["asr"] == pytest.approx(rec["metrics"]["asr"])
    assert ev["metrics"]["acc"] == pytest.approx(rec["metrics"]["acc"])
    assert len(ev["feature_variance"]) == 3

    # the clean teacher measured with the backdoored model's trigger
    assert main(["evaluate", "--run", str(teacher), "--trigger-from", str(bd),
                 "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    assert "asr" in json.loads((tmp_path / "ev" / "record.json").read_text())["metrics"]


def test_resume_of_finished_run_keeps_result(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["train", "--model", "wrn10_1", "--epochs", "1", "--train-fraction", "0.2",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    first = (out / "record.json").read_bytes()
    assert main([*args, "--resume"]) == 2  # nothing to resume; the record is left alone
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "record.json").read_bytes() == first


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a robustkd run directory" in capsys.readouterr().err
    assert main(["train", "--model", "wrn26_4", "--epochs", "1", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    assert "wrn26_4" in capsys.readouterr().err
    assert main(["train", "--dataset", "nosuch", "--data-root", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_attack_target_out_of_range(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", "wrn10_1", "--epochs", "1", "--train-fraction", "0.1",
                 "--out", str(teacher), "--device", "cpu", "--no-progress"]) == 0
    assert main(["attack", "--attack", "blended", "--teacher", str(teacher), "--target", "12",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "--target 12" in capsys.readouterr().err


def test_models_lists_paper_models(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r["parameters"] for r in json.loads(capsys.readouterr().out)}
    assert abs(rows["wrn28_4"] - 5.87e6) / 5.87e6 < 0.02
    assert "pyramidnet200" in rows and "resnet56" in rows


def test_attack_flags_reach_the_trigger():
    from robustkd.attacks import get_attack
    from robustkd.settings import entry_options

    args = build_parser().parse_args(["attack", "--attack", "blended", "--model", "wrn10_1",
                                      "--dataset", "digits", "--blended-alpha", "0.3",
                                      "--out", "x"])
    spec = get_attack("blended")
    given = entry_options(args, args._attack_flags, "blended", choose="--attack")
    assert given == {"alpha": 0.3}  # only what the user gave: the defaults stay in one place
    assert spec.make_settings(given).alpha == 0.3 and spec.make_settings({}).alpha == 0.15


def test_attack_flag_of_another_attack_is_refused(capsys):
    code = main(["attack", "--attack", "badnets", "--model", "wrn10_1", "--dataset", "digits",
                 "--blended-alpha", "0.3", "--out", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "--blended-alpha applies to --attack blended, not badnets" in err
    assert not Path("x").exists()


def test_attack_setting_out_of_range_names_it(capsys):
    code = main(["attack", "--attack", "blended", "--model", "wrn10_1", "--dataset", "digits",
                 "--blended-alpha", "1.5", "--out", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "alpha (--blended-alpha) must be <= 1.0, got 1.5" in err


def test_import_refuses_pickle_unless_opted_in(tmp_path, capsys):
    import torch

    from robustkd.models import build_model

    net = build_model("wrn10_1", num_classes=10, in_channels=1)
    torch.save(net.state_dict(), tmp_path / "hub.pth")
    out = tmp_path / "imported"
    args = ["import", "--model", "wrn10_1", "--weights", str(tmp_path / "hub.pth"),
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--allow-pickle"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert 0.0 <= rec["metrics"]["acc"] <= 1.0
    assert main(["import", "--model", "wrn10_2", "--weights", str(out / "model.safetensors"),
                 "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert "does not fit the wrn10_2" in capsys.readouterr().err


def test_old_flag_spellings_still_work_with_a_notice(tmp_path, capsys):
    from robustkd.cli_legacy import legacy_options

    args = build_parser().parse_args(["attack", "--attack", "blended", "--model", "wrn10_1",
                                      "--dataset", "digits", "--alpha", "0.3", "--out", "x"])
    assert legacy_options(args, "attack", "blended") == {"alpha": "0.3"}
    assert "--blended-alpha" in capsys.readouterr().err
    args = build_parser().parse_args(["distill", "--teacher", "t", "--method", "robustkd",
                                      "--tau", "0.3", "--robustkd-config", "paper",
                                      "--defense", "anp", "--defense-set", "iterations=3",
                                      "--out", "x"])
    assert legacy_options(args, "robustkd", "robustkd") == {"tau": "0.3"}
    assert legacy_options(args, "defense", "anp") == {"iterations": 3}
    assert args.robustkd_preset == "paper"
    assert "--anp-iterations" in capsys.readouterr().err
