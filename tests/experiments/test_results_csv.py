"""results.csv: one row per run, the settings that differ, every metric."""

from __future__ import annotations

import csv

from robustkd.experiments.results_csv import rows, write_results_csv


def item(run_id, params, metrics, parents=None, seed=0):
    return {"node": {"id": run_id, "kind": "distill", "params": params,
                     "parents": parents or {}},
            "record": {"metrics": metrics, "seed": seed, "seconds": 1.5, "device": "cpu",
                       "precision": "fp32", "git_rev": "abc"}}


def test_rows_keep_varying_settings_and_every_metric(tmp_path):
    items = [item("a", {"epochs": 3, "method": "fkd", "options": {"beta": 1.0}},
                  {"acc": 0.7, "asr": 0.4}, {"teacher": "t"}),
             item("b", {"epochs": 3, "method": "kd", "options": {"beta": 2.0}},
                  {"acc": 0.6}, {"teacher": "t"}, seed=1)]
    header, table = rows(items)
    assert "setting.epochs" not in header  # the same for every run
    assert {"setting.method", "setting.options.beta", "metric.acc", "metric.asr"} <= set(header)
    path = write_results_csv(tmp_path, items)
    read = list(csv.DictReader(path.open()))
    assert [r["id"] for r in read] == ["a", "b"] and read[0]["parents"] == "teacher=t"
    assert read[1]["metric.asr"] == "" and read[1]["setting.options.beta"] == "2.0"
    assert read[1]["seed"] == "1" and read[0]["seconds"] == "1.5"
    assert read[0]["precision"] == "fp32"
