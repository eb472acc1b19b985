"""RobustKD with a pruning step (``prune anp``, the ``anp-prune`` preset): the teacher copy is
pruned by ANP's criterion, then distilled from; with no masks and no synthesis this is
exactly ``--defense anp`` + FKD, saved so that ``--resume`` and ``--detox-from`` reuse it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robustkd import api
from robustkd.defenses.robustkd import PRESETS, PRUNE_BATCHES, robustkd_config
from robustkd.defenses.robustkd_transform import PRUNE_DIR
from robustkd.errors import ConfigError

ITERATIONS = 3


def _distill(teacher_run, out, **kw):
    return api.distill(teacher=teacher_run, student="wrn10_1", epochs=1, clean_fraction=0.1,
                       device="cpu", progress=False, out=out, seed=3, **kw)


def _student(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_the_preset_prunes_with_anp_and_trains_no_masks():
    cfg = robustkd_config({"preset": "anp-prune"})
    assert (cfg.prune, cfg.masks, cfg.consistency) == ("anp", False, 0.0)
    assert cfg.prune_options() == {"iterations": PRESETS["anp-prune"]["prune_iterations"]}
    assert robustkd_config({"preset": "paper"}).prune == "none"  # the paper prunes nothing


def test_the_accuracy_bound_presets_pass_their_pruning_settings_to_anp():
    acc = robustkd_config({"preset": "anp-prune-acc"})
    assert acc.prune_options() == {"iterations": PRUNE_BATCHES, "max_acc_drop": 0.1}
    ft = robustkd_config({"preset": "anp-prune-ft"})
    assert ft.prune_options() == {"iterations": PRUNE_BATCHES, "max_acc_drop": 0.1,
                                  "finetune_epochs": 5}
    with pytest.raises(ConfigError, match="prune_max_acc_drop"):
        robustkd_config({"prune": "anp", "prune_max_acc_drop": 1.5})


def test_a_bounded_pruning_chooses_its_threshold_and_fine_tunes(digits_teacher_run, tmp_path):
    rec = _distill(digits_teacher_run, tmp_path / "rkd", method="robustkd",
                   robustkd={"preset": "anp-prune-ft", "prune_iterations": ITERATIONS,
                             "prune_finetune_epochs": 1})
    report = rec["robustkd"]["prune"]
    assert report["threshold_choice"] == "max_acc_drop"
    search = report["threshold_search"]
    ok = [c["threshold"] for c in search["candidates"]
          if c["val_acc"] >= search["val_acc_unpruned"] - 0.1 - 1e-12]
    assert report["threshold"] == (max(ok) if ok else 0.0)
    assert len(report["finetune_history"]) == 1


def test_an_unknown_pruning_names_the_flag_and_choices():
    with pytest.raises(ConfigError, match=r"prune.*'none', 'anp'|prune.*anp"):
        robustkd_config({"prune": "magnitude"})
    with pytest.raises(ConfigError, match="prune_iterations"):
        robustkd_config({"prune": "anp", "prune_iterations": 0})


def test_pruned_robustkd_is_the_anp_defence_then_fkd(digits_teacher_run, tmp_path):
    pruned = _distill(digits_teacher_run, tmp_path / "rkd", method="robustkd",
                      robustkd={"preset": "anp-prune", "prune_iterations": ITERATIONS})
    baseline = _distill(digits_teacher_run, tmp_path / "anp", method="fkd", defense="anp",
                        defense_options={"iterations": ITERATIONS})
    report = pruned["robustkd"]["prune"]
    assert report["name"] == "anp" and report["settings"]["iterations"] == ITERATIONS
    assert report["masks"] == baseline["defense"]["masks"]
    assert pruned["prune_seconds"] > 0
    # the same cleaned teacher, then the same FKD: the same student, bit for bit
    a, b = _student(tmp_path / "rkd"), _student(tmp_path / "anp")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pruned["metrics"] == baseline["metrics"]
    assert (tmp_path / "rkd" / PRUNE_DIR / "defended_teacher.safetensors").exists()
    # the detoxified teacher of the record is the pruned one
    assert (pruned["robustkd"]["detoxified_teacher_metrics"]
            == baseline["defense"]["cleaned_teacher_metrics"])


def test_the_pruned_teacher_is_measured_once(digits_teacher_run, tmp_path, monkeypatch):
    import robustkd.defenses.registry as registry
    import robustkd.defenses.robustkd_transform as transform

    calls = []
    for module in (registry, transform):
        real = module.evaluate_model

        def counting(model, *args, _real=real, **kw):
            calls.append(id(model))
            return _real(model, *args, **kw)

        monkeypatch.setattr(module, "evaluate_model", counting)
    done = _distill(digits_teacher_run, tmp_path / "once", method="robustkd",
                    robustkd={"preset": "anp-prune", "prune_iterations": ITERATIONS})
    assert len(calls) == 1  # the report's evaluation of the pruned teacher, not a second one
    assert (done["robustkd"]["detoxified_teacher_metrics"]
            == done["robustkd"]["prune"]["cleaned_teacher_metrics"])


def test_detox_from_reuses_the_pruned_teacher(digits_teacher_run, tmp_path):
    options = {"preset": "anp-prune", "prune_iterations": ITERATIONS}
    _distill(digits_teacher_run, tmp_path / "first", method="robustkd", robustkd=options)
    again = _distill(digits_teacher_run, tmp_path / "second", method="robustkd",
                     robustkd=options, detox_from=tmp_path / "first")
    assert again["robustkd"]["prune"]["reused"] is True
    assert not (tmp_path / "second" / PRUNE_DIR).exists()
    with pytest.raises(ConfigError, match="no teacher pruned with anp"):
        _distill(digits_teacher_run, tmp_path / "third", method="robustkd",
                 robustkd={**options, "prune_iterations": ITERATIONS + 1},
                 detox_from=tmp_path / "first")


def test_the_pruning_is_logged(digits_teacher_run, tmp_path, capsys):
    _distill(digits_teacher_run, tmp_path / "s", method="robustkd",
             robustkd={"preset": "anp-prune", "prune_iterations": ITERATIONS})
    printed = capsys.readouterr()
    assert "teacher channels (anp); pruned teacher {'acc'" in printed.out + printed.err


def test_the_python_api_cleans_a_copy_and_leaves_the_users_teacher(digits):
    from robustkd.data.subsets import per_class_subset
    from robustkd.defenses.robustkd import run_robustkd
    from robustkd.distill import DistillRun
    from robustkd.training.loop_settings import LoopSettings
    from robustkd.training.optim import OptimConfig
    from tests.toy_models import TinyNet

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = run_robustkd(teacher, student, per_class_subset(digits.train, per_class=20), None,
                          robustkd_config(),  # the default: FST on a copy, then FKD
                          loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=32,
                                            progress=False),
                          run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)),
                          teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    assert report["prune"]["name"] == "fst" and report["teacher"] is not teacher
    assert report["masks"] is None  # the default trains no masks
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_the_fst_preset_is_the_fst_defence_then_fkd(digits_teacher_run, tmp_path, capsys):
    cfg = robustkd_config({"preset": "fst"})
    assert (cfg.prune, cfg.masks, cfg.prune_options()) == ("fst", False, {})
    assert cfg.only_prunes()
    tuned = _distill(digits_teacher_run, tmp_path / "rkd", method="robustkd",
                     robustkd={"preset": "fst"})
    baseline = _distill(digits_teacher_run, tmp_path / "fst", method="fkd", defense="fst")
    assert tuned["robustkd"]["prune"]["name"] == "fst"
    a, b = _student(tmp_path / "rkd"), _student(tmp_path / "fst")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert tuned["metrics"] == baseline["metrics"]
    printed = capsys.readouterr()
    assert "teacher copy cleaned by fst: {'acc'" in printed.out + printed.err


def test_anp_only_settings_are_refused_with_another_teacher_defence():
    with pytest.raises(ConfigError, match=r"--robustkd-prune-iterations\) applies to prune "
                                          r"'anp', not 'fst'"):
        robustkd_config({"preset": "fst", "prune_iterations": 10})
    with pytest.raises(ConfigError, match="prune_student"):
        robustkd_config({"prune_student": "fst"})  # the student is pruned, not tuned


@pytest.mark.parametrize("logit_teacher", ["original", "defended"])
def test_the_logit_term_reads_the_original_or_the_tuned_teacher(digits, monkeypatch,
                                                                logit_teacher):
    """``fst-logits``: FKD's features from the FST-tuned copy, KD's soft targets from the
    teacher the user gave (or, ``defended``, from the tuned copy's own logits)."""
    cfg = robustkd_config({"preset": "fst-logits", "logit_teacher": logit_teacher})
    assert (cfg.prune, cfg.masks, cfg.logit_weight) == ("fst", False, 1.0)
    assert not cfg.only_prunes()  # not the same runs as the fst column
    teacher, seen = _what_fkd_receives(cfg, digits, monkeypatch)
    assert seen["feature_teacher"] is not teacher  # FKD reads the tuned copy
    assert seen["options"] == {"logit_weight": 1.0}
    expected = teacher if logit_teacher == "original" else None
    assert seen["logit_teacher"] is expected


def test_the_shallow_kd_preset_distils_the_teacher_itself_without_its_deepest_layer(
        digits, monkeypatch):
    """``shallow-kd``: no cleaning of the teacher; FKD on every layer but the deepest plus
    KD's soft targets from the same teacher."""
    cfg = robustkd_config({"preset": "shallow-kd"})
    assert (cfg.prune, cfg.masks, cfg.skip_deepest, cfg.logit_weight) == \
        ("none", False, True, 1.0)
    assert not cfg.distils_plainly() and not cfg.only_prunes()
    teacher, seen = _what_fkd_receives(cfg, digits, monkeypatch)
    assert seen["feature_teacher"] is teacher and seen["logit_teacher"] is None
    assert seen["options"] == {"logit_weight": 1.0, "skip_deepest": True}


def _what_fkd_receives(cfg, digits, monkeypatch):
    """Run RobustKD configuration ``cfg`` on tiny nets with its distillation replaced by a
    recorder; returns the teacher given and the distillation's arguments (the teacher it
    reads as ``feature_teacher``)."""
    import robustkd.defenses.robustkd as rkd
    from robustkd.data.subsets import per_class_subset
    from robustkd.distill import DistillRun
    from robustkd.training.loop_settings import LoopSettings
    from robustkd.training.optim import OptimConfig
    from tests.toy_models import TinyNet

    seen = {}
    monkeypatch.setattr(rkd, "distill_student",
                        lambda teacher, *a, **kw: seen.update(kw, feature_teacher=teacher))
    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    rkd.run_robustkd(teacher, student, per_class_subset(digits.train, per_class=10), None, cfg,
                     loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=32,
                                       progress=False),
                     run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)),
                     teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    return teacher, seen


def test_the_tuning_epochs_reach_fst_and_are_refused_elsewhere():
    assert robustkd_config({"prune_epochs": 2}).prune_options() == {"epochs": 2}
    with pytest.raises(ConfigError, match="--robustkd-prune-epochs.*applies to prune 'fst'"):
        robustkd_config({"preset": "anp-prune", "prune_epochs": 2})
    with pytest.raises(ConfigError, match="--robustkd-prune-iterations.*applies to prune 'anp'"):
        robustkd_config({"prune_iterations": 5})  # the default tunes, it does not prune


def test_the_fst_mixup_preset_distils_the_tuned_copy_on_blended_batches(digits, monkeypatch):
    """``fst-mixup``: FST's tuned copy, then FKD with mixup (Beta(1, 1)) on its batches."""
    cfg = robustkd_config({"preset": "fst-mixup"})
    assert (cfg.prune, cfg.masks, cfg.mixup) == ("fst", False, 1.0)
    assert not cfg.only_prunes()  # not the same runs as the fst column
    teacher, seen = _what_fkd_receives(cfg, digits, monkeypatch)
    assert seen["feature_teacher"] is not teacher and seen["logit_teacher"] is None
    assert seen["options"] == {"mixup": 1.0}
