"""benchmarks/bench_store.py: what a later session's run store gets back from results."""

from __future__ import annotations

import json

from robustkd.experiments import plan
from robustkd.experiments.runner import RECORD_ONLY_FILE, is_finished, is_record_only
from tests.bench_scripts import load_script


def test_restored_records_are_finished_record_only_runs_even_when_others_read_them(tmp_path):
    store = load_script("bench_store")
    cells = plan(["benchmark"], "mini", seeds=3)["benchmark"]
    read = {p.id: p for c in cells for p in c.node.parents.values()}
    fkd = next(c.node for c in cells if c.column.startswith("fkd/") and c.node.id in read)
    leaf = next(c.node for c in cells if c.column.startswith("kd/"))
    gone = {**leaf.spec(), "id": "a-node-no-longer-planned"}
    records = tmp_path / "records.jsonl"
    records.write_text("".join(
        json.dumps({"node": node, "record": {"metrics": {"acc": 0.5}}}) + "\n"
        for node in (fkd.spec(), leaf.spec(), gone)))
    out = tmp_path / "bench"
    store.restore_records(records, out, "mini")
    for node in (fkd, leaf):  # the FKD student is read by a student pruned after it
        assert is_finished(out, node) and is_record_only(out, node)
        assert sorted(p.name for p in (out / "runs" / node.id).iterdir()) == \
            sorted(["node.json", "record.json", RECORD_ONLY_FILE])
    assert not (out / "runs" / "a-node-no-longer-planned").exists()
    # a run already there is not replaced
    (out / "runs" / leaf.id / "record.json").write_text('{"metrics": {"acc": 0.9}}')
    store.restore_records(records, out, "mini")
    assert json.loads((out / "runs" / leaf.id / "record.json").read_text())["metrics"]["acc"] == 0.9
