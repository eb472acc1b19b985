"""Every example job file in examples/ runs through ``--config`` (digits, shortened)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustkd.cli import main
from robustkd.jobs import JOBS, read_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORDER = ("train", "attack", "distill", "evaluate", "scan", "import", "defend")
SHORT = {"train": ["--epochs", "2"], "attack": ["--epochs", "1"],
         "distill": ["--epochs", "1", "--robustkd-detox-epochs", "1",
                     "--robustkd-inversion-epochs", "1"]}


def test_there_is_one_example_per_command():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(JOBS)
    for name in JOBS:  # each parses as its command's job
        JOBS[name].from_dict(read_config(EXAMPLES / f"{name}.yaml"))


@pytest.mark.slow
def test_the_examples_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write under runs/example/
    for name in ORDER:
        argv = [name, "--config", str(EXAMPLES / f"{name}.yaml"), "--device", "cpu",
                *SHORT.get(name, [])]
        if name in ("train", "attack", "distill", "defend"):
            argv.append("--no-progress")
        assert main(argv) == 0, capsys.readouterr().err
    student = json.loads(Path("runs/example/student/record.json").read_text())
    assert student["config"]["method"] == "robustkd"
    assert student["config"]["robustkd"]["detox_epochs"] == 1  # the flag overrode the file
    assert student["config"]["epochs"] == 1 and student["config"]["clean_fraction"] == 0.2
    assert "asr" in json.loads(Path("runs/example/student/evaluation/record.json")
                               .read_text())["metrics"]
    assert Path("runs/example/imported/model.safetensors").exists()
    defended = json.loads(Path("runs/example/student-defended/record.json").read_text())
    assert defended["defense"]["settings"]["iterations"] == 20
    assert "asr" in defended["parent_metrics"]  # the student's teacher's trigger
