"""The step-overhead benchmark times the default RobustKD's real step: FKD from its cleaned
teacher copy, one JSON line per method."""

from __future__ import annotations

import json
import sys

import pytest

from tests.bench_scripts import load_script


def test_robustkd_step_is_fkd_from_a_cleaned_copy_and_prints_ratios(monkeypatch, capsys):
    step = load_script("step_overhead")
    monkeypatch.setattr(sys, "argv", ["step_overhead", "--methods", "fkd,robustkd",
                                      "--teacher", "wrn10_2", "--student", "wrn10_1",
                                      "--images", "64", "--batch-size", "32",
                                      "--repeats", "1", "--no-amp"])
    step.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["method"] for line in lines] == ["fkd", "robustkd"]
    for line in lines:
        assert line["channels_last"] is True  # as `robustkd distill` runs by default
        assert line["bf16"] is False  # --no-amp
        assert line["bare_img_s"] > 0 and line["loop_img_s"] > 0
        assert line["ratio"] == pytest.approx(line["loop_img_s"] / line["bare_img_s"],
                                              rel=0.01)
        assert line["method_img_s"] > 0
        assert line["loop_to_method"] == pytest.approx(
            line["loop_img_s"] / line["method_img_s"], rel=0.01)
        # the whole call adds the run's setup to the same epoch: never faster than the epoch
        assert 0 < line["call_img_s"] <= line["loop_img_s"]
        assert line["call_ratio"] == pytest.approx(line["call_img_s"] / line["bare_img_s"],
                                                   rel=0.01)


def test_a_preset_whose_step_is_not_fkd_is_refused(monkeypatch):
    step = load_script("step_overhead")
    from robustkd.defenses import robustkd as rkd
    monkeypatch.setattr(step, "robustkd_config",
                        lambda: rkd.robustkd_config({"preset": "improved"}))
    with pytest.raises(SystemExit, match="not a pruned teacher"):
        step.step_models("robustkd", None, None, "cpu", False, False)


def test_the_default_step_distils_by_fkd_from_a_copy():
    step = load_script("step_overhead")
    from robustkd.models import build_model
    teacher = build_model("wrn10_2", num_classes=10)
    data = step.random_images(64, 10)
    pruned, method = step.step_models("robustkd", teacher, data, "cpu", False, True)
    assert method == "fkd" and pruned is not teacher
    assert step.step_models("kd", teacher, data, "cpu", False, True) == (teacher, "kd")
