"""Typed jobs: one default per setting, lossless serial forms, and every stored record and
run id still loads."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from robustkd import api
from robustkd.errors import ConfigError
from robustkd.experiments.plan import RunNode
from robustkd.jobs import JOBS, DistillJob, EvaluateJob, TrainJob, read_config, to_yaml

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
API = {"train": api.train, "attack": api.attack, "distill": api.distill,
       "evaluate": api.evaluate, "scan": api.scan, "import": api.import_weights,
       "defend": api.defend}


@pytest.mark.parametrize("command", sorted(JOBS))
def test_the_api_defaults_are_the_jobs(command):
    params = inspect.signature(API[command]).parameters
    api_defaults = {k: p.default for k, p in params.items()
                    if p.default is not inspect.Parameter.empty}
    job = JOBS[command]
    flat = job().flat()
    assert set(flat) == set(params), "job and API take the same keys"
    assert {k: flat[k] for k in api_defaults} == api_defaults
    assert set(params) - set(api_defaults) == set(job.REQUIRED)


@pytest.mark.parametrize("command", sorted(JOBS))
def test_serial_forms_round_trip(command, tmp_path):
    job = JOBS[command]
    values = {k: "x" for k in job.REQUIRED}
    made = job.from_flat(values)
    assert job.from_flat(made.flat()) == made
    assert job.from_dict(made.to_dict()) == made
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(made))
    assert job.from_dict(read_config(path)) == made


def test_values_are_checked_where_they_enter():
    with pytest.raises(ConfigError, match="no setting 'epoch' .did you mean 'epochs'"):
        TrainJob.from_flat({"epoch": 3})
    with pytest.raises(ConfigError, match=r"lr \(--lr\) must be > 0.0, got -0.1"):
        TrainJob.from_flat({"lr": -0.1})
    with pytest.raises(ConfigError, match=r"epochs \(--epochs\) must be >= 1, got 0"):
        TrainJob.from_flat({"epochs": 0})
    with pytest.raises(ConfigError, match=r"lr \(--lr\) must be a finite number"):
        TrainJob.from_flat({"lr": float("nan")})
    with pytest.raises(ConfigError,
                       match=r"clean_fraction \(--clean-fraction\) must be <= 1.0, got 1.5"):
        DistillJob.from_flat({"teacher": "t", "clean_fraction": 1.5})
    with pytest.raises(ConfigError, match="evaluate needs run"):
        EvaluateJob.from_flat({})
    with pytest.raises(ConfigError, match="distill has no setting 'download'"):
        DistillJob.from_flat({"download": True})


def test_a_config_for_another_command_or_schema_is_refused(tmp_path):
    body = TrainJob().to_dict()
    with pytest.raises(ConfigError, match="the config is for `train`, not `distill`"):
        DistillJob.from_dict(body)
    with pytest.raises(ConfigError, match="config schema 99"):
        TrainJob.from_dict({**body, "schema": 99})
    with pytest.raises(ConfigError, match="no key 'optimm' .did you mean 'optim'"):
        TrainJob.from_dict({**body, "optimm": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config(bad)


def stored_runs():
    """``(node, record)`` of every run kept in benchmarks/results."""
    for f in sorted(RESULTS.rglob("records.jsonl")):
        for line in f.read_text().splitlines():
            item = json.loads(line)
            yield item["node"], item["record"]


def test_every_stored_record_loads_as_a_job_and_keeps_its_run_id():
    runs = list(stored_runs())
    assert len(runs) > 50
    nodes = {}
    for node, record in runs:
        JOBS[record["command"]].from_flat(record["config"])
        JOBS[node["kind"]].from_flat({**node["params"], **dict.fromkeys(node["parents"], "x")})
        nodes[node["id"]] = node

    def rebuild(node_id: str) -> RunNode:
        n = nodes[node_id]
        label = n["id"].rsplit("-", 1)[0]
        return RunNode(n["kind"], label, n["params"],
                       {k: rebuild(p) for k, p in n["parents"].items()}, n.get("revision", 1))

    checked = [i for i, n in nodes.items() if all(p in nodes for p in n["parents"].values())]
    assert len(checked) > 40
    for node_id in checked:
        assert rebuild(node_id).id == node_id


def test_a_renamed_setting_keeps_its_former_name_everywhere(tmp_path, capsys):
    from robustkd.cli import main
    from robustkd.jobs import ScanJob

    # API keyword, config key and harness plans of before the rename
    assert ScanJob.from_flat({"model_dir": "r", "samples": 7}).run == "r"
    assert ScanJob.from_flat({"model_dir": "r", "samples": 7}).feature_samples == 7
    cfg = tmp_path / "scan.yaml"
    cfg.write_text("schema: 1\ncommand: scan\nmodel_dir: r\nsamples: 9\n")
    assert ScanJob.from_dict(read_config(cfg)).feature_samples == 9
    with pytest.raises(ConfigError, match="give 'run' or its former name 'model_dir'"):
        EvaluateJob.from_flat({"run": "a", "model_dir": "b"})
    # the former flag: same job, and a note naming the new flag
    assert main(["scan", "--model-dir", "r", "--samples", "5", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "run: r" in out and "feature_samples: 5" in out
    assert "--model-dir is now --run" in err and "--samples is now --feature-samples" in err
