"""RobustKD with the student pruned last (``prune_student anp``, presets ``student-prune``
and ``prune-both``): FKD as usual, then ANP's criterion prunes the student in place, and the
saved model is the pruned one; ``robustkd defend`` on a plain FKD student computes the same."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robustkd import api
from robustkd.defenses.robustkd import robustkd_config
from robustkd.defenses.robustkd_transform import PRUNE_DIR, STUDENT_PRUNE_DIR
from robustkd.errors import ConfigError

ITERATIONS = 10


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A digits teacher of a few epochs."""
    out = tmp_path_factory.mktemp("sp") / "t"
    api.train(dataset="digits", model="wrn10_1", epochs=5, out=out, device="cpu",
              progress=False)
    return out


def _distill(teacher_run, out, **kw):
    return api.distill(teacher=teacher_run, student="wrn10_1", epochs=3, clean_fraction=0.3,
                       device="cpu", progress=False, out=out, seed=3, **kw)


def _zeroed_bn_channels(state: dict[str, torch.Tensor]) -> int:
    return sum(int((v == 0).sum()) for k, v in state.items()
               if k.endswith(".weight") and v.dim() == 1)


def test_the_presets_prune_the_student_and_are_not_a_plain_teacher_defence():
    cfg = robustkd_config({"preset": "student-prune"})
    assert (cfg.prune, cfg.prune_student, cfg.masks) == ("none", "anp", False)
    assert cfg.prune_student_options() == {"iterations": 150}
    both = robustkd_config({"preset": "prune-both"})
    assert (both.prune, both.prune_student) == ("anp", "anp")
    assert not both.only_prunes()  # the student's pruning is a step of its own
    with pytest.raises(ConfigError, match="prune_student_iterations"):
        robustkd_config({"prune_student": "anp", "prune_student_iterations": 0})


def test_the_student_is_fkd_then_pruned_in_place_as_defend_would(teacher_run, tmp_path):
    _distill(teacher_run, tmp_path / "fkd", method="fkd")
    done = _distill(teacher_run, tmp_path / "sp", method="robustkd",
                    robustkd={"preset": "student-prune",
                              "prune_student_iterations": ITERATIONS})
    report = done["robustkd"]["student_prune"]
    assert report["name"] == "anp" and report["settings"]["iterations"] == ITERATIONS
    assert done["robustkd"]["prune"] is None  # the teacher is read as it is
    assert done["student_prune_seconds"] > 0
    saved = load_file(str(tmp_path / "sp" / "model.safetensors"))
    plain = load_file(str(tmp_path / "fkd" / "model.safetensors"))
    # the same FKD student, except for the channels the pruning zeroed
    assert _zeroed_bn_channels(saved) - _zeroed_bn_channels(plain) == report["pruned"]
    differs = [k for k in saved if not torch.equal(saved[k], plain[k])]
    assert all(k.endswith(".weight") and saved[k].dim() == 1 for k in differs)
    assert report["mask_stats"]["min"] < 1.0  # the masks were optimised
    # the record measures the pruned student: its metrics are the pruning's own evaluation
    assert done["metrics"]["acc"] == pytest.approx(report["cleaned_teacher_metrics"]["acc"])
    assert (tmp_path / "sp" / STUDENT_PRUNE_DIR / "defense.json").exists()
    assert not (tmp_path / "sp" / PRUNE_DIR).exists()
    # `robustkd defend` on the plain FKD student, with the run's seed and defender data,
    # gives the preset's student bit for bit (the benchmark builds the column this way)
    cleaned = api.defend(run=tmp_path / "fkd", defense="anp",
                         options={"iterations": ITERATIONS}, clean_fraction=0.3, seed=3,
                         device="cpu", progress=False, out=tmp_path / "defended")
    again = load_file(str(tmp_path / "defended" / "model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert cleaned["defense"]["masks"] == report["masks"]
    assert cleaned["metrics"] == done["metrics"]
