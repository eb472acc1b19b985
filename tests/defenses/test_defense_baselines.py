"""Defence baselines of METHOD.md 5.7 (fine-tuning, NAD): loss, copies, effect, records."""

import json
import math

import pytest
import torch

from robustkd import api
from robustkd.attacks import patch_trigger, poison_dataset
from robustkd.cli import main
from robustkd.data import per_class_subset
from robustkd.defenses import DefenseContext, defend_teacher
from robustkd.defenses.finetune import anchored_step
from robustkd.distill.losses import attention_loss, attention_map
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import accuracy, attack_success_rate
from robustkd.runs import run_meta, save_run_model
from robustkd.training.classifier import train_classifier
from robustkd.training.optim import OptimConfig
from tests.run_dirs import as_if_killed


def test_attention_loss_golden_value():
    # student: channel 0 = [1, 2], channel 1 = [3, 0] over two positions
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    # teacher: both channels = [0, 1]
    t = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])
    # mean_c |F|^2: student [5, 2] -> [5, 2] / sqrt(29); teacher [0, 1] -> [0, 1]
    assert torch.allclose(attention_map(s), torch.tensor([[5.0, 2.0]]) / math.sqrt(29), atol=1e-6)
    assert torch.allclose(attention_map(t), torch.tensor([[0.0, 1.0]]), atol=1e-6)
    # mean over positions of the squared differences
    expected = ((5 / math.sqrt(29)) ** 2 + (2 / math.sqrt(29) - 1) ** 2) / 2
    assert attention_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.628609, rel=1e-5)
    # scale-free: the channel mean and the channel sum give the same normalised map
    assert torch.allclose(attention_map(3 * s), attention_map(s), atol=1e-6)
    assert attention_loss(s, s).item() == pytest.approx(0.0, abs=1e-12)


def _ctx(digits, fraction=0.3, **kw):
    clean = per_class_subset(digits.train, fraction=fraction, seed=0)
    return DefenseContext(clean=clean, mean=digits.mean, std=digits.std,
                          augment=digits.augment, progress=False, **kw)


def test_finetune_changes_a_copy_only(digits, digits_teacher):
    before = {k: v.clone() for k, v in digits_teacher.state_dict().items()}
    ctx = _ctx(digits, 0.1, test=digits.test)
    cleaned, report = defend_teacher("finetune", digits_teacher, ctx, {"epochs": 1})
    assert cleaned is not digits_teacher
    for key, value in digits_teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"original teacher {key} changed"
    assert any(not torch.equal(v, before[k]) for k, v in cleaned.state_dict().items()
               if v.is_floating_point())
    assert report["name"] == "finetune" and report["settings"]["epochs"] == 1
    assert report["seconds"] > 0 and len(report["history"]) == 1
    assert set(report["cleaned_teacher_metrics"]) == {"acc"}  # no trigger given: no ASR


def test_anchored_step_is_cross_entropy_plus_the_soft_target_term():
    torch.manual_seed(0)
    model, anchor = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss, logs = anchored_step(model, anchor, 0.7)(x, y, torch.arange(8))
    p_t = torch.softmax(anchor(x).detach() / 4, 1)
    kd = 16 * (p_t * (p_t.log() - torch.log_softmax(model(x) / 4, 1))).sum(1).mean()
    expected = torch.nn.functional.cross_entropy(model(x), y) + 0.7 * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["anchor_loss"].item() == pytest.approx(8 * kd.item(), rel=1e-5)
    loss.backward()
    assert anchor.weight.grad is None  # the anchor is read, never trained


def test_anchored_finetune_stays_nearer_the_original_predictions(digits, digits_teacher):
    ctx = _ctx(digits, 0.1)
    x = (digits.test.images[:200].float() / 255 - torch.tensor(digits.mean).view(1, -1, 1, 1)) \
        / torch.tensor(digits.std).view(1, -1, 1, 1)
    with torch.no_grad():
        original = torch.log_softmax(digits_teacher(x) / 4, 1)

    def drift(options):
        tuned, _ = defend_teacher("finetune", digits_teacher, ctx,
                                  {"epochs": 3, "lr": 0.01, **options})
        with torch.no_grad():
            logp = torch.log_softmax(tuned(x) / 4, 1)
        return float((original.exp() * (original - logp)).sum(1).mean())

    plain, anchored = drift({}), drift({"anchor_weight": 1.0})
    assert anchored < 0.75 * plain, (anchored, plain)


def test_finetune_on_a_share_of_the_clean_images(digits, digits_teacher):
    ctx = _ctx(digits, 0.2)
    _, report = defend_teacher("finetune", digits_teacher, ctx,
                               {"epochs": 1, "data_fraction": 0.5})
    half = per_class_subset(ctx.clean, 0.5, seed=ctx.seed)
    assert report["images"] == len(half) < len(ctx.clean)
    assert len(half) - 64 < report["history"][0]["images"] <= len(half)  # drawn from the share
    with pytest.raises(ConfigError, match="data.fraction"):
        defend_teacher("finetune", digits_teacher, ctx, {"data_fraction": 0.0})


def test_defense_settings_are_checked(digits, digits_teacher):
    with pytest.raises(ConfigError, match="no setting"):
        defend_teacher("finetune", digits_teacher, _ctx(digits), {"betas": (1.0,)})
    with pytest.raises(ConfigError, match="one beta per distillation layer"):
        defend_teacher("nad", digits_teacher, _ctx(digits), {"betas": (5000.0,)})
    with pytest.raises(ConfigError, match="unknown teacher defence"):
        defend_teacher("prune", digits_teacher, _ctx(digits))


@pytest.mark.slow
def test_nad_lowers_the_asr_of_a_badnets_teacher(digits, digits_teacher):
    """BadNets digits teacher (ACC 0.98, ASR 1.0), NAD defaults but 2 + 3 epochs on the whole
    digits training set. One NAD run here is a coin with a bent edge: on 20% of the set its
    ASR ranged 0.02-0.92 over eight loader seeds, and CI's processor (other numerics) drew
    1.0. On the whole set eight loader seeds gave 0.00-0.37 at ACC 0.975-0.986, while the
    attention teacher (plain fine-tuning at the same lr) kept ASR 1.0 every time. Asserted:
    the mean ASR of two loader seeds <= 0.5 (down from >= 0.9), ACC within 0.1."""
    model = digits_teacher
    trigger = patch_trigger(digits.train.image_size, 1, size=3, position="br")
    poisoned = poison_dataset(digits.train, trigger, target=0, ratio=0.1, seed=0)
    train_classifier(model, poisoned, digits.test, mean=digits.mean, std=digits.std,
                     augment=digits.augment, epochs=5, seed=1, batch_size=64, progress=False,
                     eval_every=0, optim=OptimConfig(lr=0.01, schedule="constant"))
    acc0 = accuracy(model, digits.test, digits.mean, digits.std)
    asr0 = attack_success_rate(model, digits.test, trigger, 0, digits.mean, digits.std)
    assert asr0 >= 0.9
    asrs = []
    for seed in (0, 1):
        ctx = _ctx(digits, 1.0, test=digits.test, trigger=trigger, target=0, seed=seed)
        torch.manual_seed(seed)
        _, report = defend_teacher("nad", model, ctx, {"teacher_epochs": 2, "epochs": 3})
        m = report["cleaned_teacher_metrics"]
        print(f"seed {seed}: backdoored ASR {asr0:.3f}; attention teacher "
              f"{report['attention_teacher_metrics']}; NAD {m}")
        assert m["acc"] >= acc0 - 0.1
        asrs.append(m["asr"])
    assert sum(asrs) / len(asrs) <= 0.5


@pytest.fixture
def bd_dir(tmp_path, digits_teacher, digits):
    """A teacher run carrying a trigger (the weights are clean: only the record is checked)."""
    trig = patch_trigger(digits.train.image_size, 1, size=3)
    out = tmp_path / "bd"
    save_run_model(out, digits_teacher, run_meta(digits_teacher, digits, None, 0, trigger=trig,
                                                 target=0), trig)
    return out


COMMON = ["--student", "wrn10_1", "--epochs", "1", "--clean-fraction", "0.2", "--device", "cpu",
          "--no-progress", "--lr", "0.05", "--eval-every", "0"]


def test_cli_nad_then_fkd_writes_defence_record(tmp_path, bd_dir):
    weights_before = (bd_dir / "model.safetensors").read_bytes()
    out = tmp_path / "nad"
    assert main(["distill", "--teacher", str(bd_dir), "--defense", "nad", "--nad-epochs", "1",
                 "--nad-teacher-epochs", "1", "--nad-betas", "250,500,1000", "--out", str(out),
                 *COMMON]) == 0
    rec = json.loads((out / "record.json").read_text())
    d = rec["defense"]
    assert d["name"] == "nad" and rec["config"]["defense"] == "nad"
    assert d["settings"]["epochs"] == 1 and d["settings"]["teacher_epochs"] == 1
    assert d["settings"]["betas"] == [250, 500, 1000] and d["settings"]["p"] == 2.0
    assert d["seconds"] > 0 and rec["defense_seconds"] == d["seconds"]
    assert {"acc", "asr"} <= set(d["cleaned_teacher_metrics"])
    assert {"acc", "asr"} <= set(d["attention_teacher_metrics"])
    assert d["layers"] == ["block1", "block2", "block3"]
    assert {"acc", "asr"} <= set(rec["metrics"]) and "asr" in rec["teacher_metrics"]
    assert (out / "defended_teacher.safetensors").exists()
    assert (bd_dir / "model.safetensors").read_bytes() == weights_before


def test_cli_rejects_misplaced_defence_flags(tmp_path, bd_dir, capsys):
    assert main(["distill", "--teacher", str(bd_dir), "--defense", "finetune", "--nad-betas",
                 "1,2,3", "--out", str(tmp_path / "x"), *COMMON]) == 2
    assert "--nad-betas applies to --defense nad, not finetune" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(bd_dir), "--finetune-lr", "0.1", "--out",
                 str(tmp_path / "y"), *COMMON]) == 2
    assert "--finetune-lr applies to --defense finetune, and --defense is not given" in \
        capsys.readouterr().err


def test_api_finetune_then_fkd_and_resume_reuses_the_defence(tmp_path, bd_dir):
    kw = dict(teacher=bd_dir, student="wrn10_1", epochs=1, clean_fraction=0.2, device="cpu",
              progress=False, lr=0.05, eval_every=0, out=tmp_path / "ft", defense="finetune",
              defense_options={"epochs": 1, "lr": 0.02})
    rec = api.distill(**kw)
    d = rec["defense"]
    assert d["name"] == "finetune" and d["settings"]["lr"] == 0.02
    assert d["settings"]["schedule"] == "constant" and d["seconds"] > 0
    assert {"acc", "asr"} <= set(d["cleaned_teacher_metrics"]) and "reused" not in d
    # interrupted after the defence (no final record, no complete mark): resume reuses it
    as_if_killed(tmp_path / "ft")
    again = api.distill(**kw, resume=True)
    assert again["defense"]["reused"] is True
    assert again["defense"]["cleaned_teacher_metrics"] == d["cleaned_teacher_metrics"]
