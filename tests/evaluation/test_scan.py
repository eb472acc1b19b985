"""Feature-variance scan: statistics, honest verdicts, the CLI writing a record and a PNG."""

import json

import torch

from robustkd.cli import main
from robustkd.evaluation.scan import ratio_interval, summarise
from robustkd.runs import run_meta, save_run_model


def test_ratio_interval_contains_truth_and_verdicts_do_not_overclaim():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=gen) * 2.0 + 1.0  # mean 2.0
    b = torch.rand(400, generator=gen) + 0.5  # mean 1.0
    ratio, lo, hi = ratio_interval(a, b)
    assert lo < 2.0 < hi and abs(ratio - 2.0) < 0.1
    _, lines = summarise(["l"], {"l": a}, {"l": b})
    assert "higher than the reference" in lines[0] and "meets the paper" in lines[0]
    same = torch.rand(50, generator=gen)
    _, lines = summarise(["l"], {"l": same}, {"l": same[torch.randperm(50, generator=gen)]})
    assert "no difference detectable" in lines[0]


def test_scan_cli_with_reference(tmp_path, digits_teacher, digits):
    run = tmp_path / "m"
    save_run_model(run, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    out = tmp_path / "scan"
    assert main(["scan", "--run", str(run), "--reference", str(run), "--feature-samples", "40",
                 "--out", str(out), "--device", "cpu"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert set(rec["layers"]) == {"block1", "block2", "block3"}
    assert all(abs(v["ratio"] - 1.0) < 1e-6 for v in rec["layers"].values())
    assert all("no difference detectable" in line for line in rec["summary"][:3])
    assert (out / "variance.png").stat().st_size > 1000
