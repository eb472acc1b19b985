"""Cross-fitted tuning: the folds, one-fold batches, each batch read by the copy that never
trained on its images, and the defence end to end on digits (resumed from its saved copies)."""

import copy

import pytest
import torch
from torch import nn

from robustkd import api
from robustkd.data import per_class_subset
from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import GroupedLoader
from robustkd.defenses import DefenseContext, defend_teacher
from robustkd.defenses.registry import load_defended
from robustkd.distill import DistillRun, distill_student
from robustkd.errors import ConfigError
from robustkd.models import build_model
from robustkd.models.folded import FoldedTeacher, assign_folds
from robustkd.runs import load_run
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig
from tests.run_dirs import as_if_killed


def test_folds_deal_every_class_evenly_and_are_seeded():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 1)
    folds = assign_folds(labels, 2, seed=5)
    for c, n in ((0, 7), (1, 4), (2, 1)):
        counts = torch.bincount(folds[labels == c], minlength=2)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert torch.equal(folds, assign_folds(labels, 2, seed=5))
    assert any(not torch.equal(folds, assign_folds(labels, 2, seed=s)) for s in range(6, 12))
    assert set(assign_folds(labels, 3, seed=0).tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="at least 2 folds"):
        assign_folds(labels, 1, seed=0)


def _rows(n: int) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageDataset(images, torch.zeros(n, dtype=torch.long), ["only"])


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_batches_hold_one_group_and_cover_each_row_once(drop_last):
    groups = torch.tensor([0, 1] * 10 + [1] * 3)  # 10 rows in group 0, 13 in group 1
    loader = GroupedLoader(_rows(23), 4, groups=groups, shuffle=True, drop_last=drop_last,
                           seed=1)
    seen = []
    for _, _, idx in loader:
        assert len(set(groups[idx].tolist())) == 1
        assert loader.group_of(idx) == int(groups[idx[0]])
        seen += idx.tolist()
    # drop_last drops each group's partial batch: 2 + 3 full batches of 4
    assert len(loader) == (5 if drop_last else 7)
    assert len(seen) == (20 if drop_last else 23) == len(set(seen))
    second = [idx.tolist() for _, _, idx in loader]
    assert second != [] and sum(second, []) != seen  # another epoch, another order
    with pytest.raises(ConfigError, match="one group per row"):
        GroupedLoader(_rows(5), 2, groups=torch.zeros(4))


def test_crossfit_tunes_one_copy_per_fold_without_that_fold(digits, digits_teacher):
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    clean = per_class_subset(digits.train, fraction=0.2, seed=0)
    ctx = DefenseContext(clean=clean, mean=digits.mean, std=digits.std, augment=digits.augment,
                         progress=False, test=digits.test, seed=4)
    folded, report = defend_teacher("crossfit", digits_teacher, ctx,
                                    {"inner": "finetune", "epochs": 2})
    assert isinstance(folded, FoldedTeacher) and len(folded.copies) == 2
    assert torch.equal(folded.folds, assign_folds(clean.labels, 2, seed=4))
    for key, value in digits_teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"original teacher {key} changed"
    a, b = (dict(c.named_parameters()) for c in folded.copies)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # tuned on different images
    assert any(not torch.equal(a[k], before[k]) for k in a)
    sizes = [r["images"] for r in report["copies"]]
    assert sizes == [int((folded.folds != k).sum()) for k in range(2)]
    assert sum(sizes) == len(clean)  # two folds: each copy tunes on the other half
    assert report["inner_settings"]["name"] == "finetune"
    assert report["inner_settings"]["epochs"] == 2 and report["inner_settings"]["lr"] == 0.01
    assert all(r["metrics"]["acc"] > 0.8 for r in report["copies"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        mean = (folded.copies[0](x) + folded.copies[1](x)) / 2
        assert torch.allclose(folded(x), mean, atol=1e-5)
    with pytest.raises(ConfigError, match="inner"):
        defend_teacher("crossfit", digits_teacher, ctx, {"inner": "nad"})


class _Scaled(nn.Module):
    """A teacher copy that multiplies a base net's output, so copies tell themselves apart."""

    def __init__(self, base: nn.Module, factor: float) -> None:
        super().__init__()
        self.base, self.factor = copy.deepcopy(base), factor

    def forward(self, x):
        return self.base(x) * self.factor


def test_each_batch_is_distilled_from_the_copy_that_never_saw_it(digits, digits_teacher,
                                                                  monkeypatch):
    clean = per_class_subset(digits.train, fraction=0.1, seed=0)
    folds = assign_folds(clean.labels, 2, seed=0)
    folded = FoldedTeacher([copy.deepcopy(digits_teacher) for _ in range(2)], folds)
    with torch.no_grad():  # copy 1 differs, so its margins must differ too
        for p in folded.copies[1].parameters():
            p.mul_(1.5)
    read = []
    grouped = GroupedLoader.group_of

    def record(self, idx):
        k = grouped(self, idx)
        read.append((k, folds[idx]))
        return k

    monkeypatch.setattr(GroupedLoader, "group_of", record)
    student = build_model("wrn10_1", num_classes=10, in_channels=1)
    loop = LoopSettings(mean=digits.mean, std=digits.std, batch_size=32, progress=False)
    _, distiller = distill_student(folded, student, clean, None, loop=loop,
                                   run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)),
                                   method="fkd")
    assert read and all(bool((f == k).all()) for k, f in read)
    assert {k for k, _ in read} == {0, 1}
    # margins per copy, read from each copy's own BNs
    m0 = [getattr(distiller, f"margin{i}") for i in range(3)]
    m1 = [getattr(distiller, f"margin{i}_t1") for i in range(3)]
    assert any(not torch.allclose(a, b) for a, b in zip(m0, m1, strict=True))
    distiller.use_teacher(1)
    assert all(torch.equal(a, b) for a, b in zip(distiller.margins(), m1, strict=True))
    wrong = FoldedTeacher(list(folded.copies), folds[:-1])
    with pytest.raises(ConfigError, match="folds cover"):
        distill_student(wrong, student, clean, None, loop=loop,
                        run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)), method="fkd")


def test_distill_with_crossfit_end_to_end_and_resumed(digits_teacher_run, tmp_path):
    kw = dict(teacher=digits_teacher_run, student="wrn10_1", epochs=1, clean_fraction=0.5,
              device="cpu", progress=False, seed=3, method="fkd", defense="crossfit",
              defense_options={"epochs": 1}, out=tmp_path / "a")
    record = api.distill(**kw)
    report = record["defense"]
    assert report["inner_settings"]["name"] == "fst"  # the default tuning
    assert report["name"] == "crossfit" and report["folded"] == {
        "copies": 2, "rows": record["clean_images"]}
    assert "acc" in report["cleaned_teacher_metrics"] and "reused" not in report
    assert record["history"] and record["history"][-1]["loss"] > 0  # it did distil
    # interrupted after the defence: resume loads the two saved copies instead of tuning
    as_if_killed(tmp_path / "a")
    again = api.distill(**kw, resume=True)
    assert again["defense"]["reused"] is True
    assert again["defense"]["cleaned_teacher_metrics"] == report["cleaned_teacher_metrics"]
    teacher = load_run(digits_teacher_run, "cpu").model
    folded, _ = load_defended(tmp_path / "a", teacher, "crossfit", {"epochs": 1})
    assert isinstance(folded, FoldedTeacher) and len(folded.folds) == record["clean_images"]
    with pytest.raises(ConfigError, match="smaller than a batch"):
        api.distill(**{**kw, "clean_fraction": 0.1, "out": tmp_path / "small"})
    with pytest.raises(ConfigError, match="only distillation can read"):
        api.defend(run=digits_teacher_run, defense="crossfit", out=tmp_path / "d",
                   device="cpu", progress=False)
