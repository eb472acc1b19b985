"""The demo's shipped teacher and its CIFAR-10 story: the teacher a user would download is
written out as an ordinary run, bit for bit the benchmark's, and the cifar10 demo distils it
as the benchmark does and draws the triggered examples with the models' predictions."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robustkd import demo, shipped
from robustkd.data import cifar
from robustkd.errors import ConfigError, DataError
from robustkd.runs import load_run
from tests.bench_scripts import load_script
from tests.data.test_data import _write_cifar10

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_the_shipped_weights_are_not_git_ignored():
    """The weights must reach a clean checkout: `*.safetensors` is ignored repo-wide, so an
    asset only ships if .gitignore excepts it (twice a session's copy never reached CI)."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for teacher in shipped.SHIPPED_TEACHERS.values():
        weights = shipped.asset_folder(teacher) / shipped.SHIPPED_WEIGHTS
        assert weights.is_file()
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(weights)],
                                 cwd=repo, check=False)
        assert ignored.returncode == 1, f"{weights} is git-ignored: it would not ship"


def test_the_shipped_teacher_is_an_ordinary_run(tmp_path):
    out = shipped.materialise("blended-stripes-cifar10", tmp_path / "t")
    run = load_run(out)
    assert run.meta["arch"] == "wrn16_2" and run.target == 0 and run.trigger is not None
    assert run.meta["dataset"]["name"] == "cifar10" and run.meta["dataset"]["data_root"] is None
    assert "reproduce benchmark" in run.meta["shipped"]["built_by"]
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype != torch.float16 for v in weights.values())
    # float16 weights widened exactly (rounding them again changes nothing); the trigger's
    # tensors ("extra.") are shipped exact
    for key, value in weights.items():
        if value.is_floating_point() and not key.startswith("extra."):
            assert torch.equal(value.half().float(), value)
    assert shipped.materialise("blended-stripes-cifar10", out) == out  # reused, not rewritten


def test_materialise_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        shipped.materialise("blended-stripes-cifar10", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no shipped teacher 'badnets'"):
        shipped.materialise("badnets", tmp_path / "x")


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "assets"
    shutil.copytree(shipped.asset_folder(shipped.shipped_teacher("blended-stripes-cifar10")), copy)
    raw = bytearray((copy / shipped.SHIPPED_WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (copy / shipped.SHIPPED_WEIGHTS).write_bytes(bytes(raw))
    monkeypatch.setattr(shipped, "asset_folder", lambda _teacher: copy)
    with pytest.raises(DataError, match="damaged"):
        shipped.materialise("blended-stripes-cifar10", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_cifar10_demo_needs_its_data_root(tmp_path):
    with pytest.raises(ConfigError, match="--data-root.*--download"):
        demo.run_demo(tmp_path, demo.DemoSettings(dataset="cifar10"))
    with pytest.raises(ConfigError, match="--dataset must be one of"):
        demo.run_demo(tmp_path, demo.DemoSettings(dataset="mnist"))
    # the digits demo's sizes are refused, not ignored, where the benchmark's apply
    with pytest.raises(ConfigError, match="--student-epochs sizes the digits demo"):
        demo.run_demo(tmp_path, demo.DemoSettings(dataset="cifar10", student_epochs=3),
                      data_root=str(tmp_path))


def _fake_download(calls: list, fail: bool = False):
    """Stands in for the network: records the call and writes the official layout."""
    def download(name, root, **_kwargs):
        calls.append((name, Path(root)))
        if fail:
            raise DataError("cannot download https://example/cifar-10-python.tar.gz (offline)")
        _write_cifar10(Path(root) / "cifar-10-batches-py", np.random.default_rng(0))
        return Path(root) / "cifar-10-batches-py"
    return download


def test_download_fetches_cifar10_once_into_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTKD_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(cifar, "download_cifar", _fake_download(calls))
    root = tmp_path / "new" / "data"  # not there yet: created
    assert demo.fetch_cifar10(str(root)) == str(root)
    assert calls == [("cifar10", root)]
    assert demo.fetch_cifar10(str(root)) == str(root)  # already there: no second download
    assert len(calls) == 1
    monkeypatch.chdir(tmp_path)
    assert demo.fetch_cifar10(None) == demo.DOWNLOAD_ROOT  # the default folder, relative
    assert calls[-1] == ("cifar10", Path(demo.DOWNLOAD_ROOT))


def test_a_failed_download_stops_the_demo_before_any_stage(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(cifar, "download_cifar", _fake_download(calls, fail=True))
    with pytest.raises(DataError, match="cannot download"):
        demo.run_demo(tmp_path / "demo", demo.DemoSettings(dataset="cifar10"),
                      data_root=str(tmp_path / "data"), download=True)
    assert calls and not (tmp_path / "demo").exists()
    with pytest.raises(ConfigError, match="--download fetches CIFAR-10"):
        demo.run_demo(tmp_path / "demo", demo.DemoSettings(), download=True)


def test_the_verdict_tells_the_user_what_crossing_and_removal_mean():
    rows = [{"model": "Blended-stripes teacher (shipped)", "acc": 0.83, "asr": 0.99},
            {"model": "FKD student", "acc": 0.814, "asr": 0.47},
            {"model": "RobustKD student", "acc": 0.804, "asr": 0.014}]
    crossed, words = demo.verdict(rows, demo.removal_rate(0.47, 0.014))
    assert crossed and "distil an untrusted teacher with RobustKD" in words
    rows[2]["asr"] = 0.4
    assert "NOT removed" in demo.verdict(rows, demo.removal_rate(0.47, 0.4))[1]
    rows[1]["asr"] = 0.05
    crossed, words = demo.verdict(rows, None)
    assert not crossed and "did not reach" in words and "--dataset cifar10 --download" in words



def test_the_printed_table_keeps_its_columns_for_a_long_model_name():
    rows = [{"model": "Blended-stripes teacher (shipped)", "acc": 0.842, "asr": 1.0,
             "seconds": None},
            {"model": "FKD student", "acc": 0.815, "asr": 0.587, "seconds": 2650.0},
            {"model": "RobustKD student", "acc": 0.801, "asr": 0.0, "seconds": 3300.0}]
    text = demo.format_summary({"rows": rows, "removal_rate": demo.removal_rate(0.587, 0.0)})
    table = text.splitlines()[:4]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    acc_ends = table[0].index("ACC") + len("ACC")  # right-aligned under their header
    assert all(line.index("%") + 1 == acc_ends for line in table[1:])

@pytest.mark.slow
@pytest.mark.shared_data
def test_cifar10_demo_distils_the_shipped_teacher_and_draws_examples(tmp_path, monkeypatch):
    if not (SHARED_DATA / "cifar10.tar.gz").exists() and not any(SHARED_DATA.glob("cifar10*")):
        pytest.skip(f"no CIFAR-10 archive in {SHARED_DATA}")
    tiny = dataclasses.replace(demo.get_scale("mini").benchmark, student_epochs=1,
                               clean_fraction=0.004)
    monkeypatch.setattr(demo, "get_scale",
                        lambda _name: type("S", (), {"benchmark": tiny})())
    settings = demo.DemoSettings(dataset="cifar10", prune_epochs=1)
    summary = demo.run_demo(tmp_path, settings, device="cpu", progress=False,
                            data_root=str(SHARED_DATA))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["Blended-stripes teacher (shipped)",
                                                   "FKD student", "RobustKD student"]
    assert saved["rows"][0]["asr"] > 0.9  # the shipped backdoor, on the user's test set
    ex = saved["examples"]
    assert len(ex["labels"]) == demo.EXAMPLES and ex["target"] == 0
    assert all(label != 0 for label in ex["labels"])  # non-target images only
    assert set(ex["predictions"]) == {"shipped-teacher", "fkd-student", "robustkd-student"}
    # the examples span the test set (several classes); the teacher sends most to 0
    assert len(set(ex["labels"])) >= 4
    assert sum(p == 0 for p in ex["predictions"]["shipped-teacher"]) >= demo.EXAMPLES // 2
    assert (tmp_path / "summary.png").stat().st_size > 5000
    assert "Blended-stripes teacher (shipped)" in demo.format_summary(summary)
    record = json.loads((tmp_path / "fkd-student" / "record.json").read_text())
    assert record["config"]["epochs"] == 1 and record["clean_images"] == 200
    # the summary records the settings the students were distilled with
    assert saved["settings"]["epochs"] == 1 and saved["settings"]["student"] == "wrn16_1"
    assert saved["settings"]["robustkd"] == {"preset": "fst", "prune_epochs": 1}


@pytest.mark.slow
def test_fractals_demo_distils_the_shipped_teacher_offline(tmp_path, monkeypatch):
    tiny = {**demo.FRACTALS_STUDENTS, "epochs": 1, "clean_fraction": 0.02}
    monkeypatch.setattr(demo, "FRACTALS_STUDENTS", tiny)
    summary = demo.run_demo(tmp_path, demo.DemoSettings(prune_epochs=1), device="cpu",
                            progress=False)  # no data root: the data are generated
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["dataset"] == "fractals"
    assert [r["model"] for r in saved["rows"]] == ["Blended-stripes teacher (shipped)",
                                                   "FKD student", "RobustKD student"]
    assert saved["rows"][0]["asr"] > 0.9 and saved["rows"][0]["acc"] > 0.9
    record = json.loads((tmp_path / "fkd-student" / "record.json").read_text())
    assert record["config"]["epochs"] == 1 and record["clean_images"] == 200
    assert saved["settings"]["robustkd"] == {"preset": "fst", "prune_epochs": 1}
    ex = saved["examples"]
    assert len(ex["labels"]) == demo.EXAMPLES and all(label != 0 for label in ex["labels"])
    assert sum(p == 0 for p in ex["predictions"]["shipped-teacher"]) >= demo.EXAMPLES // 2
    assert "Blended-stripes teacher (shipped)" in demo.format_summary(summary)
    with pytest.raises(ConfigError, match="--teacher-epochs sizes the digits demo"):
        demo.run_demo(tmp_path / "other", demo.DemoSettings(teacher_epochs=3))
    again = demo.run_demo(tmp_path, demo.DemoSettings(prune_epochs=1), device="cpu",
                          progress=False, resume=True)  # the same demo: its records reused
    assert again["rows"] == summary["rows"]
    monkeypatch.setattr(demo, "FRACTALS_STUDENTS", {**tiny, "epochs": 2})
    with pytest.raises(ConfigError, match="fkd-student only as it ran; these settings differ: "
                                          "epochs 1 -> 2"):
        demo.run_demo(tmp_path, demo.DemoSettings(prune_epochs=1), device="cpu",
                      progress=False, resume=True)  # changed students: not the old records


def test_ship_teacher_packages_a_run_that_materialise_gives_back(tmp_path, monkeypatch,
                                                                   digits_teacher_run):
    ship = load_script("ship_teacher")
    folder = tmp_path / "assets" / "digits-t"
    entry = ship.ship(digits_teacher_run, folder, "robustkd train --dataset digits ...")
    assert entry["built_by"].startswith("robustkd train") and len(entry["sha256"]) == 64
    with pytest.raises(SystemExit, match="exists"):
        ship.ship(digits_teacher_run, folder, "again")  # an asset is never replaced silently
    teacher = shipped.ShippedTeacher("digits-t", "digits-t", "digits", "t", "a test asset")
    monkeypatch.setitem(shipped.SHIPPED_TEACHERS, "digits-t", teacher)
    monkeypatch.setattr(shipped, "asset_folder", lambda _teacher: folder)
    out = shipped.materialise("digits-t", tmp_path / "t")
    original = load_file(str(digits_teacher_run / "model.safetensors"))
    widened = load_file(str(out / "model.safetensors"))
    assert widened.keys() == original.keys()
    for key, value in original.items():  # float16-rounded floating weights, the rest exact
        want = value.half().float() if value.is_floating_point() else value
        assert torch.equal(widened[key], want), key
    with pytest.raises(SystemExit, match="not a finished run"):
        ship.ship(tmp_path / "nothing", tmp_path / "assets" / "x", "cmd")
