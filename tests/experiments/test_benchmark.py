"""The defence benchmark: fixed teachers and defender data, seeded students, its report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustkd import api
from robustkd.cli import main as cli_main
from robustkd.data.dataset import ImageDataset
from robustkd.evaluation.metrics import evaluate_model
from robustkd.experiments import plan, reproduce
from robustkd.experiments.bench_report import benchmark_markdown, criteria_line
from robustkd.experiments.benchmark import BENCH_SEEDED, BENCH_TEACHERS, TEACHER_FREE
from robustkd.experiments.report import load_records


def test_benchmark_fixes_teachers_and_clean_data_and_seeds_only_students():
    cells = plan(["benchmark"], "mini", seeds=3)["benchmark"]
    found = {c.node.id: c.node for c in cells}
    found.update({p.id: p for c in cells for p in c.node.parents.values()})
    nodes = found.values()
    teachers = [n for n in nodes if n.kind == "attack"]
    assert len(teachers) == len(BENCH_TEACHERS) >= 4
    assert {n.params["seed"] for n in teachers} == {0}
    assert len([n for n in nodes if n.kind == "train"]) == 1
    by_attack = {n.params["attack"]: n for n in teachers}
    # learned triggers are optimised on the clean teacher; fixed ones need no model
    assert set(by_attack["ckd"].parents) == {"trigger_teacher"}
    assert by_attack["badnets"].parents == {}
    assert all("dataset" in n.params for n in teachers)  # poisoned from scratch
    students = [n for n in nodes if n.kind == "distill"]
    assert {s.params["clean_seed"] for s in students} == {0}
    assert {s.params["clean_fraction"] for s in students} == {0.2}
    def reads(node, teacher) -> bool:  # a student of teacher, or a cleaned one
        parent = node.parents.get("teacher") or node.parents.get("run")
        return parent is teacher or (parent is not None and reads(parent, teacher))

    for teacher in teachers:
        seeds = {}
        for c in cells:
            if c.node.kind in ("distill", "defend") and reads(c.node, teacher):
                seeds.setdefault(c.column.split("/")[0], set()).add(c.seed)
        assert {m for m, v in seeds.items() if v == {0, 1, 2}} == set(BENCH_SEEDED)
        assert all(v == {0} for m, v in seeds.items() if m not in BENCH_SEEDED)
        assert not set(seeds) & set(TEACHER_FREE)
    # a student that never reads its teacher is trained once per seed and measured under
    # every backdoored teacher's trigger
    (clean,) = [n for n in nodes if n.kind == "train"]
    free = [s for s in students if s.parents["teacher"] is clean]
    assert sorted(s.params["method"] for s in free) == sorted(TEACHER_FREE)
    evaluations = [n for n in nodes if n.kind == "evaluate"]
    assert all(set(f.parents) == {"model_dir", "trigger_from"} for f in evaluations)
    floors = [f for f in evaluations if f.parents["model_dir"] is clean]
    assert {f.parents["trigger_from"].id for f in floors} == {t.id for t in teachers}
    under = [f for f in evaluations if f.parents["model_dir"] in free]
    assert len(under) == len(teachers) * len(free)


def test_an_unknown_benchmark_teacher_or_method_fails_before_running(tmp_path):
    from robustkd.errors import ConfigError

    with pytest.raises(ConfigError, match="benchmark teacher"):
        plan(["benchmark"], "smoke", attacks=["nope"])
    with pytest.raises(ConfigError, match="unknown student recipe"):
        plan(["benchmark"], "smoke", methods=["fkd", "nope"])


@pytest.mark.slow
def test_smoke_benchmark_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "bench"
    args = dict(scale="smoke", out=out, attacks=["ckd-scratch", "badnets-scratch"],
                methods=["ce", "fkd", "robustkd-student-prune"], seeds=2, device="cpu",
                progress=False, log=lambda m: None)
    first = reproduce(["benchmark"], **args)
    # clean teacher, one CE student; per teacher: itself, floor, CE under its trigger, 2 FKD,
    # and each FKD student pruned (the student-prune column)
    assert first["run"] == first["total"] == 1 + 1 + 2 * (1 + 1 + 1 + 2 + 2)
    again = reproduce(["benchmark"], **args)
    assert again["run"] == 0 and again["skipped"] == first["total"]
    records = load_records(out)
    layout = json.loads((out / "studies" / "benchmark.json").read_text())
    run_of = {(c["column"], c["seed"]): c["run"] for c in layout["cells"]}
    ckd = records[run_of[("teacher/ckd-scratch", 0)]]
    floor = records[run_of[("floor/ckd-scratch", 0)]]
    # the attack measured the clean trigger teacher under its trigger; the floor node
    # measures the same model under the same trigger independently
    assert ckd["teacher_metrics"]["asr"] == pytest.approx(floor["metrics"]["asr"])
    assert ckd["config"]["trigger_teacher"].endswith(run_of[("teacher/clean", 0)])
    s0, s1 = (records[run_of[("fkd/ckd-scratch", s)]] for s in (0, 1))
    assert s0["config"]["clean_seed"] == s1["config"]["clean_seed"] == 0
    assert s0["seed"] == 0 and s1["seed"] == 1
    assert {"acc", "asr", "racc"} <= set(s0["metrics"])
    assert s0["precision"] in ("bf16", "fp32")
    text = (out / "report.md").read_text()
    assert "### ckd-scratch" in text and "### badnets-scratch" in text
    assert "| FKD | 2/2 |" in text and "R-ACC %" in text and "Criteria:" in text
    fkd_rows = [line for line in text.splitlines() if line.startswith("| FKD | 2/2 |")]
    assert fkd_rows and all(line.endswith("| 1.00 |") for line in fkd_rows)  # x FKD time
    assert (out / "benchmark-ckd-scratch.png").stat().st_size > 1000
    pruned = records[run_of[("robustkd-student-prune/ckd-scratch", 1)]]
    assert pruned["command"] == "defend" and pruned["config"]["seed"] == 1
    # its time counts the FKD student it cleaned
    assert pruned["parent_seconds"] == pytest.approx(s1["seconds"])


def test_time_against_fkd_is_given_only_between_runs_of_one_arithmetic():
    layout = {"scale": "smoke", "cells": [
        {"column": c, "run": f"{c}-{s}", "seed": s}
        for c in ("teacher/t", "fkd/t", "finetune/t", "nad/t") for s in (0, 1)]}

    def rec(seconds, precision=None):
        r = {"metrics": {"acc": 0.8, "asr": 0.1}, "seconds": seconds}
        return r | ({"precision": precision} if precision else {})

    records = {"teacher/t-0": rec(50), "teacher/t-1": rec(50),
               "fkd/t-0": rec(100, "bf16"), "fkd/t-1": rec(100, "bf16"),
               "finetune/t-0": rec(150, "bf16"), "finetune/t-1": rec(130, "bf16"),
               "nad/t-0": rec(400, "fp32")}
    rows = {line.split(" |")[0]: line for line in benchmark_markdown(layout, records).splitlines()
            if line.startswith("| ")}
    assert rows["| fine-tuning + FKD"].endswith("| 1.40 |")
    # an fp32 run against bf16 FKD runs: no ratio, and why
    assert rows["| NAD + FKD"].endswith("| – (bf16 vs fp32) |")
    # records older than the field compare among themselves only
    records["fkd/t-1"] = rec(100)
    assert "– (bf16 vs unrecorded) |" in benchmark_markdown(layout, records)


def test_criteria_marks_met_failed_and_missing():
    nums = {"teacher_acc": 80.0, "teacher_asr": 95.0, "clean_acc": 82.0, "floor": 4.0,
            "fkd": 55.0, "ce": 3.0, "finetune": None}
    line = criteria_line(nums)
    assert "✓ teacher ASR ≥ 90" in line and "✓ FKD ASR ≥ 40" in line
    assert "? fine-tune + FKD ASR ≥ 30 (deep)" in line
    assert "✗ clean teacher ASR ≤ 10" in criteria_line({**nums, "floor": 30.0})


class _Always(nn.Module):
    """Predicts one class whatever the input."""

    def __init__(self, cls: int, classes: int = 3) -> None:
        super().__init__()
        self.cls, self.classes, self.dummy = cls, classes, nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.classes)
        out[:, self.cls] = 1.0
        return out + 0 * self.dummy


def test_racc_counts_triggered_images_kept_at_their_true_label():
    from robustkd.triggers import Trigger

    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    ds = ImageDataset(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"])
    trig = Trigger(torch.ones(3, 4, 4), torch.full((1, 4, 4), 0.5))
    m = evaluate_model(_Always(1), ds, (0.5,) * 3, (0.25,) * 3, trigger=trig, target=0)
    # 5 non-target images: none go to the target, 2 of 5 keep their label (class 1)
    assert m["asr"] == 0.0 and m["racc"] == pytest.approx(2 / 5)
    m = evaluate_model(_Always(0), ds, (0.5,) * 3, (0.25,) * 3, trigger=trig, target=0)
    assert m["asr"] == 1.0 and m["racc"] == 0.0


def test_clean_seed_fixes_the_defenders_images_across_student_seeds(monkeypatch, tmp_path):
    seen = []
    real = api.per_class_subset

    def spy(ds, *, fraction, seed):
        seen.append(seed)
        return real(ds, fraction=fraction, seed=seed)

    monkeypatch.setattr(api.data, "per_class_subset", spy)  # where the api subsets data
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=tmp_path / "t", device="cpu",
              progress=False)
    seen.clear()
    for seed in (1, 2):
        api.distill(method="ce", teacher=tmp_path / "t", student="wrn10_1", epochs=1,
                    clean_fraction=0.2, clean_seed=7, seed=seed, device="cpu",
                    progress=False, out=tmp_path / f"s{seed}")
    assert seen == [7, 7]


def test_a_bad_defence_setting_is_refused_before_loading_anything(tmp_path, capsys):
    # the teacher does not exist: the settings are checked first, where the flag entered
    rc = cli_main(["distill", "--teacher", str(tmp_path / "none"), "--defense", "finetune",
                   "--finetune-epochs", "-3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "defence finetune: epochs (--finetune-epochs) must be >= 0, got -3" in err


def test_a_learned_trigger_from_scratch_needs_a_trigger_teacher(tmp_path):
    from robustkd.errors import ConfigError

    with pytest.raises(ConfigError, match="--trigger-teacher"):
        api.attack(attack="ckd", model="wrn10_1", dataset="digits", epochs=1,
                   out=tmp_path / "x", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--trigger-teacher is for poisoning from scratch"):
        api.attack(attack="ckd", teacher=tmp_path / "t", trigger_teacher=tmp_path / "t",
                   out=tmp_path / "y", device="cpu", progress=False)


def test_defence_flags_reach_the_defence_from_the_cli(tmp_path):
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=tmp_path / "t", device="cpu",
              progress=False)
    rc = cli_main(["distill", "--teacher", str(tmp_path / "t"), "--student", "wrn10_1",
                   "--defense", "anp", "--anp-iterations", "3",
                   "--anp-threshold", "0.3", "--epochs", "1", "--clean-fraction", "0.2",
                   "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")])
    assert rc == 0
    rec = json.loads((tmp_path / "s" / "record.json").read_text())
    settings = rec["defense"]["settings"]
    assert settings["iterations"] == 3 and settings["threshold"] == 0.3
    assert rec["defense"]["threshold"] == 0.3 and rec["defense"]["pruned"] >= 0


def test_a_recipes_defence_options_override_the_scales_sizes():
    cells = plan(["benchmark"], "mini", seeds=1)["benchmark"]
    params = {c.column.split("/")[0]: c.node.params for c in cells
              if c.column.endswith("/sig-scratch")}
    assert params["anp"]["defense_options"]["iterations"] == 500
    assert params["anp-short"]["defense_options"]["iterations"] == 150
    assert params["anp-short"]["defense"] == "anp"


def test_a_defences_revision_names_new_runs_and_keeps_every_other_id():
    from robustkd.defenses.registry import TEACHER_DEFENSES
    from robustkd.experiments.plan import RunNode

    cells = plan(["benchmark"], "mini", seeds=1)["benchmark"]
    nodes = {c.column: c.node for c in cells if c.column.endswith("/sig-scratch")}
    ibau, anp = nodes["ibau/sig-scratch"], nodes["anp/sig-scratch"]
    assert TEACHER_DEFENSES["ibau"].revision == ibau.revision == 2
    assert ibau.spec()["revision"] == 2 and "revision" not in anp.spec()
    # the same parameters at revision 1 are another run (the records of before the fix)
    old = RunNode(ibau.kind, ibau.label, ibau.params, ibau.parents)
    assert old.id != ibau.id and old.label == ibau.label
    # revision 1 leaves the identity as it was before revisions existed
    same = RunNode(anp.kind, anp.label, anp.params, anp.parents, 1)
    assert same.id == anp.id
    # a RobustKD run that prunes with a defence carries that defence's revision too
    from robustkd.experiments.plan import defence_revision
    assert defence_revision({"robustkd": {"prune": "ibau"}}) == 2
    assert defence_revision({"robustkd": {"prune_student": "ibau", "prune": "none"}}) == 2
    assert defence_revision({"robustkd": {"prune": "anp"}, "defense": "finetune"}) == 1
    assert defence_revision({"method": "fkd"}) == 1


def test_a_robustkd_column_that_only_prunes_shares_the_baselines_runs():
    from robustkd.experiments.benchmark import BenchPlanner, bench_recipe
    from robustkd.experiments.scales import get_scale
    from robustkd.experiments.specs import Recipe

    scale = get_scale("mini")
    planner = BenchPlanner(scale, scale.benchmark)
    pruning = Recipe("p", "prune", "robustkd", {"preset": "anp-prune"})
    assert planner.twin(pruning, ["anp", "anp-short"]).name == "anp-short"  # 150 = 150
    longer = Recipe("q", "prune", "robustkd", {"preset": "anp-prune", "prune_iterations": 500})
    assert planner.twin(longer, ["anp-short"]) is longer  # other settings: its own runs
    assert planner.twin(longer, ["anp", "anp-short"]).name == "anp"  # the scale's 500
    masked = Recipe("r", "prune", "robustkd", {"preset": "anp-prune", "masks": True})
    assert planner.twin(masked, ["anp-short"]) is masked  # masks too: not a baseline
    assert planner.twin(bench_recipe("fkd"), ["anp-short"]).name == "fkd"
    smoke = get_scale("smoke")  # the smoke sizes prune 5 batches, anp-short still 150
    assert BenchPlanner(smoke, smoke.benchmark).twin(pruning, ["anp-short"]) is pruning


def test_a_column_that_prunes_the_student_last_cleans_another_columns_student():
    cells = plan(["benchmark"], "mini", seeds=3)["benchmark"]
    by = {(c.column, c.seed): c.node for c in cells}
    for seed in (0, 1, 2):
        later = by[("robustkd-student-prune/sig-scratch", seed)]
        assert later.kind == "defend" and later.parents["run"] is by[("fkd/sig-scratch", seed)]
        assert later.params == {"defense": "anp", "options": {"iterations": 150},
                                "clean_fraction": 0.2, "clean_seed": 0, "seed": seed}
        both = by[("robustkd-prune-both/sig-scratch", seed)]
        # after the anp-prune teacher pruning: its student (the anp-short runs) is cleaned
        assert both.parents["run"] is by[("anp-short/sig-scratch", seed)]
        # the default (FST + FKD) shares the FST baseline's runs
        assert by[("robustkd-default/sig-scratch", seed)] is by[("fst/sig-scratch", seed)]
    from robustkd.experiments.benchmark import BenchPlanner
    from robustkd.experiments.scales import get_scale
    from robustkd.experiments.specs import Recipe

    scale = get_scale("mini")
    planner = BenchPlanner(scale, scale.benchmark)
    masked = Recipe("m", "masks then pruned", "robustkd",
                    {"preset": "student-prune", "masks": True})
    assert planner.pruned_later(masked, ["fkd"]) is None  # its FKD is not plain FKD
    assert planner.pruned_later(Recipe("s", "s", "robustkd", {"preset": "student-prune"}),
                                ["anp-short"]) is None  # no FKD column to clean
