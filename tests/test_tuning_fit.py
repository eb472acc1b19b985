"""benchmarks/tuning_fit.py: a defended copy's fit on the defender's images against other
training images, and a cross-fitted cell read copy by copy."""

import json

import pytest
import torch
from torch import nn

from robustkd.models.folded import FoldedTeacher
from tests.bench_scripts import load_script

tf = load_script("tuning_fit")


class Constant(nn.Module):
    """Always the same logits."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_fit_stats_by_hand():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1])
    stats = tf.fit_stats(Constant([1.0, 0.0]), images, labels, (0.0,), (1.0,), batch=3)
    p0 = torch.tensor([1.0, 0.0]).softmax(0)
    assert stats["acc"] == 0.75 and stats["conf"] == pytest.approx(float(p0[0]), abs=1e-4)
    nll = (3 * -p0[0].log() - p0[1].log()) / 4
    assert stats["nll"] == pytest.approx(float(nll), abs=1e-4)


def test_a_folded_cell_is_read_by_the_copy_that_never_saw_each_image():
    # training rows 10..15 are the defender's; copy k answers class k for everything
    clean_rows = torch.arange(10, 16)
    folds = torch.tensor([0, 1, 0, 1, 0, 1])
    folded = FoldedTeacher([Constant([1.0, 0.0]), Constant([0.0, 1.0])], folds)
    labels = torch.zeros(20, dtype=torch.long)
    labels[clean_rows[folds == 1]] = 1  # each image's label is its fold's copy's answer
    images = torch.zeros(20, 1, 2, 2, dtype=torch.uint8)
    out = tf.folded_stats(folded, clean_rows, clean_rows, images, labels, (0.0,), (1.0,))
    assert out["defender_unseen"]["acc"] == 1.0 and out["defender_seen"]["acc"] == 0.0
    with pytest.raises(SystemExit, match="folds cover 6 images"):
        tf.folded_stats(folded, clean_rows, torch.arange(5), images, labels, (0.0,), (1.0,))


def test_main_on_a_digits_teacher_and_its_defended_copies(digits_teacher_run, tmp_path,
                                                          capsys):
    from robustkd import api

    common = dict(teacher=digits_teacher_run, student="wrn10_1", epochs=1, clean_fraction=0.5,
                  device="cpu", progress=False, method="fkd")
    api.distill(out=tmp_path / "ft", defense="finetune", defense_options={"epochs": 3},
                **common)
    api.distill(out=tmp_path / "cf", defense="crossfit",
                defense_options={"epochs": 1, "inner": "finetune"}, **common)
    capsys.readouterr()
    tf.main(["--teacher", str(digits_teacher_run), "--defended", str(tmp_path / "ft"),
             "--defended", str(tmp_path / "cf"), "--clean-fraction", "0.5",
             "--images", "200"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in rows] == ["teacher", "defended", "defended"]
    assert {"defender", "other_train"} <= set(rows[0]) and rows[0]["images"] == 200
    assert {"defender_unseen", "defender_seen", "other_train"} <= set(rows[2])
    # three epochs on the defender's images: the copy fits them better than the others
    assert rows[1]["defender"]["nll"] < rows[1]["other_train"]["nll"]
