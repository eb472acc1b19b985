"""Streamed ImageFolder data through the API and the CLI (train, distill, evaluate).

A tiny ImageFolder tree (3 classes x 8 generated images, 40x48 px, JPEG and PNG) stands in
for ImageNet-1k: the same code path, seconds instead of days.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustkd import api
from robustkd.cli import main
from robustkd.data.dataset import ImageDataset
from robustkd.data.streaming import EXTRACT_MARKER, load_streamed
from robustkd.data.subsets import per_class_subset
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.models import build_model
from robustkd.triggers import patch_trigger

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 8
NAME = "toynet"


def _image(cls: int, k: int) -> Image.Image:
    """A 48x40 picture whose dominant colour channel is its class (learnable, not trivial)."""
    rng = np.random.default_rng(100 * cls + k)
    arr = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
    arr[:, :, cls] += np.uint8(120)
    return Image.fromarray(arr)


def _write_tree(root: Path) -> Path:
    for split, count in (("train", PER_CLASS), ("val", PER_CLASS // 2)):
        for c, name in enumerate(CLASSES):
            folder = root / NAME / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                ext = "png" if k % 2 else "jpg"
                _image(c, k + (0 if split == "train" else 50)).save(folder / f"{k:03d}.{ext}")
    return root


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return _write_tree(tmp_path / "data")


def _run_args(**kw) -> dict:
    return {"epochs": 1, "batch_size": 8, "device": "cpu", "progress": False, "workers": 0,
            **kw}


def test_streamed_train_distill_evaluate(data_root: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    record = api.train(dataset=NAME, data_root=str(data_root), stream=True, image_size=32,
                       model="wrn10_1", lr=0.05, out=teacher_dir, **_run_args())
    assert 0.0 <= record["metrics"]["acc"] <= 1.0
    assert record["config"]["stream"] is True and len(record["history"]) == 1
    meta = json.loads((teacher_dir / "meta.json").read_text())
    assert meta["dataset"]["streamed"]["crop_size"] == 32
    assert meta["dataset"]["image_size"] == [32, 32] and meta["dataset"]["resize"] == 32
    assert meta["train_images"] == len(CLASSES) * PER_CLASS

    # the student streams again (nothing says --stream), on a per-class half of the files
    student_dir = tmp_path / "student"
    rec = api.distill(method="fkd", teacher=teacher_dir, student="wrn10_1", clean_fraction=0.5,
                      out=student_dir, **_run_args())
    assert 0.0 <= rec["metrics"]["acc"] <= 1.0 and "asr" not in rec["metrics"]
    assert rec["clean_images"] == len(CLASSES) * PER_CLASS // 2
    assert rec["config"]["stream"] is True
    s_meta = json.loads((student_dir / "meta.json").read_text())
    assert s_meta["dataset"]["streamed"]["crop_size"] == 32

    # evaluate reads the streamed run's meta and measures the same ACC on the same crops
    ev = api.evaluate(run=student_dir, device="cpu", workers=0)
    assert ev["metrics"]["acc"] == pytest.approx(rec["metrics"]["acc"])

    # what needs the data in memory says so, with the way out
    for kwargs in ({"method": "robustkd"}, {"method": "fkd", "defense": "finetune"}):
        with pytest.raises(ConfigError, match="not supported with streamed data.*in-memory"):
            api.distill(teacher=teacher_dir, student="wrn10_1", out=tmp_path / "x",
                        **_run_args(), **kwargs)
    with pytest.raises(ConfigError, match="attack badnets is not supported with streamed"):
        api.attack(attack="badnets", teacher=teacher_dir, out=tmp_path / "y", epochs=1,
                   device="cpu", progress=False)


def test_cli_stream_flags(data_root: Path, tmp_path: Path) -> None:
    """--stream/--workers reach the API from train and distill (one worker process)."""
    common = ["--data-root", str(data_root), "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "--no-progress", "--workers", "1"]
    teacher = tmp_path / "t"
    assert main(["train", "--dataset", NAME, "--stream", "--image-size", "32",
                 "--model", "wrn10_1", "--train-fraction", "0.5", "--out", str(teacher),
                 *common]) == 0
    meta = json.loads((teacher / "meta.json").read_text())
    assert meta["dataset"]["streamed"] and meta["train_images"] == 12
    assert main(["distill", "--teacher", str(teacher), "--method", "kd", "--student",
                 "wrn10_1", "--stream", "--out", str(tmp_path / "s"), *common]) == 0
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    assert record["config"]["workers"] == 1 and 0.0 <= record["metrics"]["acc"] <= 1.0
    assert main(["distill", "--teacher", str(teacher), "--method", "robustkd", "--student",
                 "wrn10_1", "--out", str(tmp_path / "r"), *common]) == 2


def test_stream_subset_follows_the_in_memory_rule(data_root: Path) -> None:
    splits = load_streamed(NAME, data_root, crop_size=16)
    files = splits.train
    same = ImageDataset(torch.zeros(len(files), 1, 2, 2, dtype=torch.uint8), files.labels.clone(),
                        list(files.classes))
    for fraction, seed in ((0.5, 0), (0.3, 7)):
        sub = per_class_subset(files, fraction=fraction, seed=seed)
        ref = per_class_subset(same, fraction=fraction, seed=seed)
        assert torch.equal(sub.labels, ref.labels) and len(sub) == len(ref)
    sub = files.subset(torch.tensor([1, 9, 17]))
    assert [sub.path(i) for i in range(3)] == [files.path(i) for i in (1, 9, 17)]
    assert np.array_equal(sub.load(2), files.load(17)) and sub.num_classes == len(CLASSES)


def test_streamed_acc_and_asr_equal_in_memory_on_same_images(data_root: Path) -> None:
    """Streaming changes where images come from, not what ACC/ASR measure."""
    splits = load_streamed(NAME, data_root, crop_size=32)
    test = splits.test
    decoded = np.stack([test.load(i) for i in range(len(test))])
    in_memory = ImageDataset(torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous(),
                             test.labels.clone(), list(test.classes))
    torch.manual_seed(0)
    model = build_model("wrn10_1", num_classes=len(CLASSES)).eval()
    trigger = patch_trigger((32, 32), 3)
    kw = {"trigger": trigger, "target": 1, "batch_size": 5}
    streamed = evaluate_model(model, test, splits.mean, splits.std, workers=0, **kw)
    memory = evaluate_model(model, in_memory, splits.mean, splits.std, **kw)
    assert streamed == memory and set(streamed) == {"acc", "asr", "racc"}


def test_archive_is_extracted_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    tree = _write_tree(tmp_path / "tree")
    (tree / NAME / "val").rename(tree / NAME / "test")  # the archives' layout: train/ + test/
    archive_root = tmp_path / "archives"
    archive_root.mkdir()
    with tarfile.open(archive_root / f"{NAME}.tar.gz", "w:gz") as tf:
        tf.add(tree / NAME, arcname=NAME)
    monkeypatch.setenv("ROBUSTKD_CACHE_DIR", str(tmp_path / "cache"))
    splits = load_streamed(NAME, archive_root, crop_size=16)
    folder = Path(splits.source)
    assert folder.is_relative_to(tmp_path / "cache") and (folder.parent / EXTRACT_MARKER).is_file()
    assert len(splits.train) == 24 and len(splits.test) == 12 and splits.test.root.endswith("test")
    assert not [p for p in folder.parent.parent.iterdir() if p.name.endswith(".tmp")]

    def fail(*_a, **_k):
        raise AssertionError("extracted twice")

    monkeypatch.setattr("robustkd.data.streaming._extract_images", fail)
    again = load_streamed(NAME, archive_root, crop_size=16)
    assert again.source == splits.source and len(again.train) == 24
