"""HTBA (clean-label, random-position patch) and adaptive CKD (variance penalty) on digits."""

import copy
import json

import pytest
import torch

from robustkd import api
from robustkd.attacks import (
    AttackContext,
    RandomPatchTrigger,
    Trigger,
    get_attack,
    random_patch_trigger,
)
from robustkd.attacks.adaptive_ckd import variance_loss
from robustkd.attacks.ckd import build_ckd_trigger
from robustkd.attacks.htba import build_htba_poison, craft_poisons
from robustkd.attacks.poison import poison_dataset
from robustkd.cli import main
from robustkd.evaluation.metrics import attack_success_rate, feature_variance
from robustkd.runs import load_run, run_meta, save_run_model
from robustkd.training.classifier import train_classifier
from robustkd.training.optim import OptimConfig

EPS = 16 / 255


def test_random_patch_moves_per_image_is_reproducible_and_round_trips():
    trig = random_patch_trigger((12, 12), 3, size=3, pattern="white", seed=5)
    x = torch.zeros(64, 3, 12, 12)
    out = trig.apply(x)
    # every image gets exactly one 3x3 white square, the rest untouched
    assert torch.equal((out == 1).sum((1, 2, 3)), torch.full((64,), 27))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    corners = {tuple(torch.nonzero(o[0])[0].tolist()) for o in out}
    assert len(corners) > 10  # positions differ between images
    assert torch.equal(trig.apply(x), out)  # same seed, same positions: reproducible ASR
    other = trig.apply(x, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other, out)

    back = Trigger.from_saved(trig.config(), trig.tensors())
    assert isinstance(back, RandomPatchTrigger) and back.image_size == (12, 12)
    assert torch.equal(back.apply(x), out)
    # a uint8 batch (as ASR evaluation uses) also goes through
    assert trig.apply_uint8(torch.zeros(4, 3, 12, 12, dtype=torch.uint8)).max() == 255


def test_htba_poisons_keep_target_labels_stay_in_bound_and_collide(digits, digits_teacher):
    settings = get_attack("htba").make_settings({"htba_poisons": 24, "htba_steps": 15,
                                                 "htba_batch": 24, "htba_eps": EPS})
    ctx = AttackContext(digits, digits_teacher, settings, "cpu")
    trig = random_patch_trigger(digits.train.image_size, 1, size=4, kind="htba")
    train = digits.train
    out = build_htba_poison(ctx, trig, train, target=0, ratio=0.1, seed=0)
    n = len(train)
    assert len(out) == n + 24 and torch.equal(out.images[:n], train.images)
    assert out.is_poison[n:].all() and not out.is_poison[:n].any()
    assert (out.labels[n:] == 0).all()  # clean-label: target-class images keep their label
    # each poison is a target-class training image moved by at most 16/255 per pixel
    zeros = train.images[train.labels == 0].int()
    diff = (out.images[n:].int()[:, None] - zeros[None]).abs().flatten(2).amax(2)
    closest = diff.min(1).values
    assert int(closest.max()) <= 16 and int(closest.max()) > 0
    report = trig.params["poison_report"]
    assert report["final_loss"] < 0.6 * report["initial_loss"], report


def test_craft_poisons_respects_eps_without_augmentation(digits, digits_teacher):
    targets = digits.train.images[digits.train.labels == 3][:8]
    sources = digits.train.images[digits.train.labels == 5][:32]
    trig = random_patch_trigger(digits.train.image_size, 1, size=4)
    poisons, report = craft_poisons(digits_teacher, targets, sources, trig, mean=digits.mean,
                                    std=digits.std, eps=4 / 255, steps=5, batch_size=8,
                                    pairing="nearest")
    assert poisons.dtype == torch.uint8 and poisons.shape == targets.shape
    assert int((poisons.int() - targets.int()).abs().max()) <= 4
    assert report["final_loss"] < report["initial_loss"] and not report["eot"]


@pytest.mark.slow
def test_htba_backdoor_beats_the_clean_model(tmp_path, digits, digits_teacher):
    teacher_dir = tmp_path / "teacher"
    save_run_model(teacher_dir, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    rec = api.attack(attack="htba", teacher=teacher_dir, out=tmp_path / "htba", device="cpu",
                     poison_ratio=1.0, epochs=10, lr=0.2, progress=False, eval_every=0,
                     options={"patch_size": 6, "htba_eps": 2 * EPS, "htba_steps": 30,
                              "htba_batch": 142})
    clean_asr, asr = rec["teacher_metrics"]["asr"], rec["metrics"]["asr"]
    # At the paper's 16/255 this tiny model's ASR is 0.03-0.12 depending on the CPU thread
    # count (float summation order moves the PGD poisons), too close to chance for a test;
    # at 32/255 observed: 0.33 (1 thread) and 0.40 (2 threads), clean teacher 0.0 both, on
    # an AVX2 CPU; 0.16 with 2 threads under bf16 on an AVX-512 BF16 CPU (2026-12-02).
    # Full fine-tuning of this tiny model leaves ~0.003 (HTBA is weak end to end, as published)
    assert clean_asr <= 0.02
    assert asr >= clean_asr + 0.1, (clean_asr, asr)
    assert rec["metrics"]["acc"] >= rec["teacher_metrics"]["acc"] - 0.03


@pytest.mark.slow
def test_adaptive_ckd_keeps_asr_and_lowers_feature_variance(digits, digits_teacher):
    opts = {"trigger_images": 300, "trigger_epochs": 2, "trigger_lr": 0.05,
            "variance_weight": 1.0}
    settings = get_attack("adaptive-ckd").make_settings(opts)
    ctx = AttackContext(digits, digits_teacher, settings, "cpu", target=0, progress=False)
    trig = build_ckd_trigger(ctx)
    poisoned = poison_dataset(digits.train, trig, 0, 0.1, seed=0)
    layer = digits_teacher.distill_layers()[-1].stage
    kw = {"mean": digits.mean, "std": digits.std, "augment": digits.augment, "epochs": 2,
          "optim": OptimConfig(lr=0.01, schedule="constant"), "batch_size": 64, "seed": 1,
          "progress": False, "eval_every": 0}
    results = {}
    for name in ("ckd", "adaptive"):
        model = copy.deepcopy(digits_teacher)
        extra = variance_loss(model, ctx, poisoned) if name == "adaptive" else None
        torch.manual_seed(0)
        train_classifier(model, poisoned, digits.test, extra_loss=extra, **kw)
        asr = attack_success_rate(model, digits.test, trig, 0, digits.mean, digits.std)
        var = feature_variance(model, [layer], digits.test, digits.mean, digits.std)[layer]
        results[name] = (asr, float(var.mean()))
    # observed: ASR 0.99 (ckd) / 0.997 (adaptive); mean variance 2.07 (ckd) vs 0.35 (adaptive)
    assert results["adaptive"][0] >= 0.8, results
    assert results["adaptive"][1] < 0.7 * results["ckd"][1], results


@pytest.mark.parametrize("attack", ["htba", "adaptive-ckd"])
def test_attack_cli_smoke(attack, tmp_path, digits_teacher, digits):
    teacher_dir = tmp_path / "teacher"
    save_run_model(teacher_dir, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    out = tmp_path / attack
    extra = (["--htba-steps", "3", "--htba-poisons", "16", "--htba-eps", "16/255"]
             if attack == "htba" else
             ["--adaptive-ckd-trigger-images", "200", "--adaptive-ckd-trigger-epochs", "1",
              "--adaptive-ckd-variance-weight", "0.5"])
    assert main(["attack", "--attack", attack, "--teacher", str(teacher_dir), "--epochs", "1",
                 *extra, "--out", str(out), "--device", "cpu", "--no-progress",
                 "--eval-every", "0"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert 0.0 <= rec["metrics"]["asr"] <= 1.0 and rec["metrics"]["acc"] > 0.5
    assert (out / "trigger_examples.png").stat().st_size > 100
    run = load_run(out)
    assert run.trigger.kind == attack and run.target == 0
    # the trigger saved with the model reproduces the recorded ASR
    again = attack_success_rate(run.model, digits.test, run.trigger, 0, digits.mean, digits.std)
    assert again == pytest.approx(rec["metrics"]["asr"])
    if attack == "htba":
        assert isinstance(run.trigger, RandomPatchTrigger)
        assert rec["trigger"]["params"]["poison_report"]["poisons"] == 16
        assert rec["poisoned_images"] == 16
    else:
        assert "variance_loss" in rec["history"][0]
        assert run.trigger.params["variance_weight"] == 0.5
