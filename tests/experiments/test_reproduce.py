"""The reproduction harness: specs -> shared runs -> resumable runner -> report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from robustkd.cli import main as cli_main
from robustkd.experiments import plan, reproduce
from robustkd.experiments.cells import interval
from robustkd.experiments.plan import Planner
from robustkd.experiments.report import load_records
from robustkd.experiments.runner import (
    RECORD_ONLY_FILE,
    RECORDS_FILE,
    Shard,
    is_finished,
    is_record_only,
    ordered_nodes,
)
from robustkd.experiments.scales import MINI, SMOKE
from robustkd.experiments.specs import STUDIES


def _nodes(cells):
    return {c.node.id: c.node for c in cells}


def test_every_study_plans_at_every_scale_and_tables_share_runs():
    for scale in ("smoke", "mini", "paper"):
        cells = plan(["all"], scale)
        assert set(cells) == set(STUDIES)
        assert all(cells[name] for name in cells)
    cells = plan(["table4", "table5"], "mini")
    # Table 5 is Table 4's runs read for ACC instead of ASR: no run of its own
    assert _nodes(cells["table4"]) == _nodes(cells["table5"])
    t4 = _nodes(cells["table4"]).values()
    # one clean teacher serves both attacks; one backdoored teacher serves every method
    assert len([n for n in t4 if n.kind == "train"]) == 1
    attacked = [n for n in t4 if n.kind == "attack"]
    assert len(attacked) == 2
    assert len({n.parents["teacher"].id for n in attacked}) == 1
    students = [n for n in t4 if n.kind == "distill"]
    assert len(students) == 6 and {s.parents["teacher"].id for s in students} == {
        a.id for a in attacked}


def test_paper_scale_uses_the_papers_pairs_and_mini_changes_sizes_only():
    cells = plan(["table4"], "paper", datasets=["cifar100"])["table4"]
    pairs = {c.pair for c in cells}
    assert pairs == {"wrn28_4-wrn16_2", "wrn28_4-resnet56", "pyramidnet200-wrn28_4",
                     "pyramidnet200-pyramidnet110"}
    students = [c.node for c in cells if c.node.kind == "distill"]
    assert {s.params["epochs"] for s in students} == {300}
    paper_rkd = next(s for s in students if s.params["method"] == "robustkd")
    mini = next(c.node for c in plan(["table4"], "mini")["table4"]
                if c.node.kind == "distill" and c.node.params["method"] == "robustkd")
    # same method options, other sizes
    drop = ("detox_epochs",)
    assert {k: v for k, v in paper_rkd.params["robustkd"].items() if k not in drop} == {
        k: v for k, v in mini.params["robustkd"].items() if k not in drop}
    assert paper_rkd.params["robustkd"]["detox_epochs"] == 40


def test_a_sweep_point_at_the_methods_own_setting_is_the_tables_run():
    cells = plan(["table4", "fig4", "fig7"], "mini")
    table = {c.column: c.node for c in cells["table4"]}
    fig4 = {c.column: c.node for c in cells["fig4"]}
    fig7 = {c.column: c.node for c in cells["fig7"]}
    for attack in ("ckd", "lba"):
        # tau 0.2 and all layers are the paper preset's own settings; FKD is shared too
        assert fig4[f"{attack}/0.2"] is table[f"robustkd/{attack}"]
        assert fig7[f"{attack}/all"] is table[f"robustkd/{attack}"]
        assert fig4[f"{attack}/fkd"] is table[f"fkd/{attack}"]
        others = [fig4[f"{attack}/{v}"] for v in ("0.1", "0.6", "1.0")]
        assert len({n.id for n in others} | {table[f"robustkd/{attack}"].id}) == 4
        assert [n.params["robustkd"]["tau"] for n in others] == [0.1, 0.6, 1.0]
    # the mini sweeps use the tables' pair (no backdoor reaches WRN-10-2 at this scale),
    # while Table 6 keeps WRN-10-2 for the paper's WRN-16-4
    assert {c.pair for c in cells["fig4"]} == {"wrn16_2-wrn16_1"}
    assert "wrn16_2-wrn10_2" in {c.pair for c in plan(["table6"], "mini")["table6"]}


def test_a_changed_setting_gives_a_new_run_id():
    a = Planner(MINI).clean_teacher("cifar10", "wrn16_2", 0)
    b = Planner(SMOKE).clean_teacher("cifar10", "wrn16_2", 0)
    assert a.id != b.id and a.label == b.label


def test_a_named_preset_is_spelled_out_in_the_run(monkeypatch):
    """Changing what a preset means must give new runs, not reuse stale records."""
    from robustkd.defenses import robustkd as rkd
    from robustkd.experiments.specs import get_recipe

    def improved_node():
        p = Planner(MINI)
        teacher = p.clean_teacher("cifar10", "wrn16_2", 0)
        return p.student(teacher, "wrn16_1", get_recipe("robustkd-improved"), 0)

    node = improved_node()
    assert node.params["robustkd"]["inversion_classes"] == "suspects"
    monkeypatch.setitem(rkd.PRESETS, "improved", {"consistency": 0.25})
    assert improved_node().id != node.id


def test_shards_split_final_runs_and_keep_their_ancestors():
    cells = [c for cs in plan(["table4"], "mini", seeds=2).values() for c in cs]
    leaves = {c.node.id for c in cells}
    parts = [ordered_nodes(cells, Shard(i, 3)) for i in range(3)]
    owned = [{n.id for n in p if n.id in leaves and Shard(i, 3).owns(n)}
             for i, p in enumerate(parts)]
    assert set().union(*owned) == leaves
    assert sum(len(o) for o in owned) == len(leaves)
    for part in parts:  # parents always come before children
        seen = set()
        for node in part:
            assert all(p.id in seen for p in node.parents.values())
            seen.add(node.id)
    with pytest.raises(Exception, match="i/n"):
        Shard.parse("3")


def test_interval_is_the_student_t_half_width():
    m, h = interval([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert interval([5.0]) == (5.0, None)


@pytest.mark.slow
def test_smoke_table4_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "rep"
    kw = {"scale": "smoke", "out": out, "attacks": ["ckd"], "device": "cpu",
          "progress": False, "log": lambda *_: None}
    first = reproduce(["table4"], max_runs=2, **kw)
    assert first["run"] == 2
    # a run killed mid-way leaves a directory without record.json: it is redone, not reused
    nodes = ordered_nodes([c for cs in plan(["table4"], "smoke", attacks=["ckd"]).values()
                           for c in cs])
    partial = out / "runs" / nodes[2].id
    partial.mkdir(parents=True)
    (partial / "node.json").write_text(json.dumps(nodes[2].spec()))
    second = reproduce(["table4"], **kw)
    assert second["skipped"] == 2 and second["run"] == len(nodes) - 2
    third = reproduce(["table4"], **kw)
    assert third["run"] == 0 and third["skipped"] == len(nodes)

    records = load_records(out)
    assert set(records) == {n.id for n in nodes}
    lines = (out / RECORDS_FILE).read_text().splitlines()
    line = json.loads(lines[0])
    assert {"node", "record"} <= set(line)
    assert {"config", "seed", "git_rev", "device", "seconds"} <= set(line["record"])
    text = (out / "report.md").read_text()
    fkd = next(n for n in nodes if n.kind == "distill" and n.params["method"] == "fkd")
    asr = 100 * records[fkd.id]["metrics"]["asr"]
    assert f"{asr:.1f} [90.17]" in text  # ours, then the paper's CKD FKD ASR
    assert "RobustKD (paper) ckd ASR" in text and "removal rate" in text


@pytest.mark.slow
def test_killed_runner_resumes_without_recomputing(tmp_path):
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "robustkd", "reproduce", "table3", "--scale", "smoke",
           "--attacks", "ckd", "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "runs").glob("*/record.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/record.json")}
    assert finished, "the runner finished nothing within 120 s"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["skipped"] >= len(finished) and result["run"] + result["skipped"] == 3
    for name, mtime in finished.items():  # finished runs were not recomputed
        assert (out / "runs" / name / "record.json").stat().st_mtime_ns == mtime
    assert not list((out / "runs").glob("*/run.lock"))


def test_cli_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys):
    assert cli_main(["reproduce", "table4", "fig4", "--scale", "mini", "--dry-run",
                     "--out", str(tmp_path / "rep")]) == 0
    assert not (tmp_path / "rep").exists()
    out = capsys.readouterr().out
    assert "to run train    cifar10-wrn16_2-clean-s0" in out
    assert "robustkd-tau0.1" in out
    assert " to run, 0 finished in " in out


def test_dry_run_marks_what_out_already_holds(tmp_path):
    """A dry run says what a real one would do: finished runs are skipped, so marked done."""
    from robustkd.experiments.runner import NODE_FILE, RECORD_FILE, ordered_nodes, run_dir

    out, lines = tmp_path / "rep", []
    first = reproduce(["table4"], scale="mini", out=out, dry_run=True, log=lines.append)
    assert first["finished"] == 0 and first["to_run"] == first["runs"] > 1
    node = ordered_nodes(plan(["table4"], "mini")["table4"])[0]
    done = run_dir(out, node)
    done.mkdir(parents=True)
    (done / NODE_FILE).write_text(json.dumps({"id": node.id}))
    (done / RECORD_FILE).write_text("{}")
    lines.clear()
    second = reproduce(["table4"], scale="mini", out=out, dry_run=True, log=lines.append)
    assert second["finished"] == 1 and second["to_run"] == first["runs"] - 1
    assert f"done   {node.kind:8s} {node.id}" in lines
    assert sum(line.startswith("done") for line in lines) == 1
    assert not (out / "report.md").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_report_command_renders_from_records(tmp_path):
    out = tmp_path / "rep"
    reproduce(["fig2"], scale="smoke", out=out, attacks=["badnets"], device="cpu",
              progress=False, log=lambda *_: None)
    (out / "report.md").unlink()
    assert cli_main(["report", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "feature variance" in text and "badnets" in text
    assert "ratio to clean" in text


def test_a_replanned_cell_takes_the_new_run(tmp_path):
    from types import SimpleNamespace

    from robustkd.experiments.runner import write_layout
    from robustkd.io import read_json

    def cell(run_id: str):
        return SimpleNamespace(dataset="gtsrb", paper_dataset="gtsrb", paper_pair="p",
                               pair="q", column="fkd/ckd", seed=0,
                               node=SimpleNamespace(id=run_id))

    write_layout(tmp_path, "table4", [cell("old-run")], {"scale": "mini", "seeds": [0]})
    path = write_layout(tmp_path, "table4", [cell("new-run")], {"scale": "mini", "seeds": [0]})
    assert [c["run"] for c in read_json(path)["cells"]] == ["new-run"]


def test_report_marks_a_cell_an_earlier_setting_filled(tmp_path):
    from robustkd.experiments.report import report
    from robustkd.experiments.runner import write_layout
    from robustkd.io import read_json, write_json

    cells = plan(["table4"], "smoke")["table4"]
    path = write_layout(tmp_path, "table4", cells, {"scale": "smoke", "seeds": [0]})
    assert "†" not in report(tmp_path).read_text()  # every cell is today's plan
    layout = read_json(path)
    old = next(c for c in layout["cells"] if c["column"] == "robustkd/ckd")
    old["run"] = "digits-wrn16_1-ckd-wrn10_1-robustkd-s0-0123456789"  # an older setting's run
    clean = next(c for c in layout["cells"] if c["column"] == "teacher/clean")
    # a row of a pair no longer planned, sharing today's clean teacher
    layout["cells"].append({**clean, "pair": "wrn16_1-wrn10_2"})
    write_json(path, layout)
    text = report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| digits"))
    # the RobustKD ckd ASR and its removal rate are marked; FKD and LBA cells are not
    assert row.count("†") == 2
    assert f"| {old['run']} † | missing" in text and "earlier setting" in text
    assert f"| {clean['run']} | missing" in text  # current in its own row: not marked


def test_sweep_report_renders_every_value_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    from robustkd.experiments.report import report
    from robustkd.experiments.runner import write_layout

    cells = plan(["fig4"], "smoke", attacks=["lba"])["fig4"]
    write_layout(tmp_path, "fig4", cells, {"scale": "smoke", "seeds": [0]})
    measured = {"lba/fkd": (0.61, 0.72), "lba/0.1": (0.60, 0.31), "lba/0.2": (0.59, 0.22)}
    lines = [json.dumps({"node": c.node.spec(), "record": {"metrics": {"acc": a, "asr": r}}})
             for c in cells for col, (a, r) in measured.items() if c.column == col]
    (tmp_path / RECORDS_FILE).write_text("\n".join(lines) + "\n")
    text = report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| digits"))
    assert row.split(" | ")[2:] == ["61.0 / 72.0", "60.0 / 31.0", "59.0 / 22.0", "– / –",
                                    "– / – |"]
    assert (tmp_path / "fig4.png").stat().st_size > 1000


def test_a_record_only_parent_is_recomputed_when_a_run_reads_its_weights(tmp_path):
    out = tmp_path / "rep"
    logged: list[str] = []
    kw = {"scale": "smoke", "out": out, "attacks": ["ckd"], "device": "cpu",
          "progress": False, "log": logged.append}
    reproduce(["table4"], **kw)
    nodes = ordered_nodes([c for cs in plan(["table4"], "smoke", attacks=["ckd"]).values()
                           for c in cs])
    child = next(n for n in nodes if n.kind == "distill" and n.params["method"] == "fkd")
    parent = next(iter(child.parents.values()))
    other = next(n for n in nodes if n.kind == "distill" and n is not child)
    # the state a results file restores: the parent's record without its weights
    pdir, cdir = out / "runs" / parent.id, out / "runs" / child.id
    for f in pdir.iterdir():
        if f.name not in ("node.json", "record.json"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    (pdir / RECORD_ONLY_FILE).write_text("{}")
    parent_record = (pdir / "record.json").stat().st_mtime_ns
    other_record = (out / "runs" / other.id / "record.json").stat().st_mtime_ns
    assert is_finished(out, parent) and is_record_only(out, parent)
    shutil.rmtree(cdir)  # the child must run again and read the parent
    logged.clear()
    result = reproduce(["table4"], **kw)
    assert result["run"] == 1  # the child; its parent is recomputed on the way
    assert any(line.startswith(f"recomputing {parent.id}") for line in logged)
    assert list(pdir.glob("*.safetensors")) and not is_record_only(out, parent)
    assert (pdir / "record.json").stat().st_mtime_ns != parent_record
    assert is_finished(out, child)
    # a finished run that reads no record-only parent is left alone
    assert (out / "runs" / other.id / "record.json").stat().st_mtime_ns == other_record
