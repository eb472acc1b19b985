"""The benchmark coverage script: marks what a store holds, per teacher, method and seed."""

from __future__ import annotations

import json
import sys

from robustkd.experiments import plan
from robustkd.experiments.runner import NODE_FILE, RECORD_FILE, run_dir
from tests.bench_scripts import load_script


def _finish(out, node) -> None:
    d = run_dir(out, node)
    d.mkdir(parents=True)
    (d / NODE_FILE).write_text(json.dumps({"id": node.id}))
    (d / RECORD_FILE).write_text("{}")


def test_coverage_marks_finished_cells_by_seed(tmp_path, capsys, monkeypatch):
    cov = load_script("bench_coverage")
    cells = plan(["benchmark"], "mini", seeds=2, attacks=["ckd-scratch"])["benchmark"]
    fkd = {c.seed: c.node for c in cells if c.column == "fkd/ckd-scratch"}
    _finish(tmp_path, fkd[1])
    grid = cov.coverage(tmp_path, "mini", 2, ["ckd-scratch"], ["fkd", "finetune"])
    assert grid[("ckd-scratch", "fkd")] == {0: False, 1: True}
    assert grid[("ckd-scratch", "finetune")] == {0: False, 1: False}
    assert set(grid) == {("ckd-scratch", "fkd"), ("ckd-scratch", "finetune")}
    text = cov.lines(grid, 2)
    assert text == ["ckd-scratch", "  finetune ..", "  fkd      .X", "1 of 4 cells finished"]
    _finish(tmp_path, fkd[0])
    grid = cov.coverage(tmp_path, "mini", 2, ["ckd-scratch"], ["fkd", "finetune"])
    assert cov.lines(grid, 2, missing_only=True) == [
        "ckd-scratch", "  finetune ..", "2 of 4 cells finished"]
    monkeypatch.setattr(sys, "argv", ["bench_coverage", "--out", str(tmp_path), "--seeds", "2",
                                      "--teachers", "ckd-scratch", "--methods", "fkd"])
    cov.main()
    assert capsys.readouterr().out.splitlines() == [
        "ckd-scratch", "  fkd XX", "2 of 2 cells finished"]
