"""The ``feature-warmup`` preset: FKD's feature loss for the first half of the steps, then
logit KD; no masks, nothing else."""

from __future__ import annotations

from robustkd import api
from robustkd.defenses.robustkd import robustkd_config


def test_the_preset_passes_its_share_to_fkd(digits_teacher_run, tmp_path):
    cfg = robustkd_config({"preset": "feature-warmup"})
    assert (cfg.feature_share, cfg.masks, cfg.prune) == (0.5, False, "none")
    assert not cfg.only_prunes()
    done = api.distill(teacher=digits_teacher_run, student="wrn10_1", epochs=2,
                       clean_fraction=0.2, device="cpu", progress=False, out=tmp_path / "w",
                       method="robustkd", robustkd={"preset": "feature-warmup"})
    first, last = done["history"]
    assert first["feat_loss"] > 0  # epoch 1: features
    assert last["feat_loss"] == 0  # epoch 2: the teacher's logits only
