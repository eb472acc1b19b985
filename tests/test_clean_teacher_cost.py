"""The clean-teacher cost benchmark prunes a teacher run by the default preset on the
defender's subset and reports what it took."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.bench_scripts import load_script


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["clean_teacher_cost", *args])
    load_script("clean_teacher_cost").main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_reports_the_pruning_of_the_default_on_a_teacher_run(monkeypatch, capsys,
                                                           digits_teacher_run):
    line = run(monkeypatch, capsys, "--teacher", str(digits_teacher_run), "--preset",
               "anp-prune", "--prune-iterations", "3", "--clean-fraction", "0.2")
    assert line["prune"] == "anp" and line["options"] == {"iterations": 3}
    assert 0 <= line["pruned"] <= line["channels"] and line["channels"] > 0
    assert 0.0 <= line["test_acc_after"] <= 1.0 and line["test_acc_before"] > 0.1
    assert line["clean_images"] < 1438


def test_a_preset_that_prunes_nothing_is_refused(monkeypatch, capsys, digits_teacher_run):
    with pytest.raises(SystemExit, match="prunes nothing"):
        run(monkeypatch, capsys, "--teacher", str(digits_teacher_run), "--preset", "paper")


def test_the_detection_probe_reads_anps_perturbed_flips(monkeypatch, capsys, digits_teacher_run,
                                                        tmp_path):
    monkeypatch.setattr(sys, "argv", ["anp_detection_probe", "--teacher",
                                      str(digits_teacher_run), "--prune-iterations", "10",
                                      "--save", str(tmp_path / "det.jsonl")])
    load_script("anp_detection_probe").main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["iterations"] == 10 and len(line["flips"]) == 10  # one block per batch
    assert line["detected"]["first_block"]["class"] in range(10)
    saved = [json.loads(x) for x in (tmp_path / "det.jsonl").read_text().splitlines()]
    assert saved == [line]


def test_the_prune_curve_prunes_saved_masks_at_every_threshold(monkeypatch, capsys,
                                                               digits_teacher_run, tmp_path):
    from robustkd.defenses.anp import THRESHOLD_GRID
    from robustkd.models.neurons import batchnorm_layers
    from robustkd.runs import load_run

    bns, _ = batchnorm_layers(load_run(digits_teacher_run).model)
    masks = {name: torch.linspace(0.0, 1.0, bn.num_features).tolist() for name, bn in bns.items()}
    run = tmp_path / "anp-run"
    run.mkdir()
    (run / "record.json").write_text(json.dumps({"defense": {
        "name": "anp", "masks": masks, "settings": {"iterations": 7}}}))
    monkeypatch.setattr(sys, "argv", ["anp_prune_curve", "--run", str(run), "--teacher",
                                      str(digits_teacher_run), "--test-share", "0.1"])
    load_script("anp_prune_curve").main()
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["threshold"] for x in lines] == [0.0, *THRESHOLD_GRID]
    for line in lines:
        expected = sum(sum(v < line["threshold"] for v in values) for values in masks.values())
        assert line["pruned"] == expected and line["mask_iterations"] == 7
    assert lines[0]["pruned"] == 0 and lines[-1]["pruned"] > lines[1]["pruned"]
    assert all(0.0 <= x["val_acc"] <= 1.0 and 0.0 <= x["test_acc"] <= 1.0 for x in lines)
    assert lines[0]["val_images"] > 0 and 0 < lines[0]["test_images"] < 1438
    (run / "record.json").write_text(json.dumps({"defense": {"name": "nad"}}))
    with pytest.raises(SystemExit, match="no ANP masks"):
        load_script("anp_prune_curve").main()
