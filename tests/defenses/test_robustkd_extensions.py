"""The pieces added to RobustKD beyond the paper's reading, the validation holdout, and the
demo (the README's main job)."""

import json

import pytest
import torch

from robustkd.attacks import patch_trigger
from robustkd.attacks.poison import poison_dataset
from robustkd.data import load_dataset
from robustkd.defenses.detox import DetoxMasks, detox_loss
from robustkd.defenses.inversion import invert_triggers, trigger_consistency
from robustkd.defenses.robustkd import PRESETS, robustkd_config
from robustkd.demo import DemoSettings, format_summary, removal_rate, run_demo
from robustkd.distill import DistillRun
from robustkd.distill.fkd import salt_and_pepper
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import attack_success_rate
from robustkd.training.classifier import train_classifier
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig


def test_holdout_is_a_fixed_disjoint_per_class_split():
    full = load_dataset("digits")
    a = load_dataset("digits", holdout=0.2)
    b = load_dataset("digits", holdout=0.2)
    assert a.holdout == 0.2 and full.holdout is None
    assert len(a.train) + len(a.test) == len(full.train)
    assert torch.equal(a.test.images, b.test.images)  # same split every time
    # every class appears in the validation part, in proportion
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 0.15 * torch.bincount(full.train.labels).min()
    # no validation image is also a training image
    train_rows = {bytes(img.numpy().tobytes()) for img in a.train.images}
    assert not any(bytes(img.numpy().tobytes()) in train_rows for img in a.test.images[:50])


def test_channel_masks_and_mask_opening_reward():
    deltas = [torch.zeros(4, 3, 3), torch.ones(2, 2, 2)]
    masks = DetoxMasks(["a", "b"], deltas, tau=1.0, mask_init=0.25, mask_shape="channel")
    assert [tuple(m.shape) for m in masks.masks] == [(4, 1, 1), (2, 1, 1)]
    feature = torch.full((5, 4, 3, 3), 2.0)
    assert torch.allclose(masks.mix(0, feature), torch.full_like(feature, 1.5))
    assert masks.mean_opening().item() == pytest.approx(0.25)
    logits = torch.tensor([[2.0, 0.0]])
    labels = torch.tensor([0])
    feat = torch.tensor([[[[1.0, 3.0]]]])  # per-example variance (unbiased) = 2
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    got = detox_loss(logits, labels, feat, "ce+var", lam=0.5, opening=torch.tensor(0.4),
                     open_weight=2.0)
    assert got.item() == pytest.approx(ce + 0.5 * 2.0 - 2.0 * 0.4)
    with pytest.raises(ConfigError):
        DetoxMasks(["a"], deltas[:1], tau=1.0, mask_shape="pixel")


def test_salt_and_pepper_touches_the_requested_share_of_pixels():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = salt_and_pepper(x, 0.1)
    changed = (y != x).any(dim=1).float().mean().item()
    assert 0.08 < changed < 0.12
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    diff = (y != x)
    for c in range(3):
        vals = y[:, c][diff[:, c]]
        assert torch.all((vals == lo[c]) | (vals == hi[c]))
    assert torch.equal(salt_and_pepper(x, 0.0), x)


def test_presets_and_overrides():
    paper = robustkd_config({"preset": "paper"})
    assert paper.tau == 0.2 and paper.consistency == 0 and paper.inversion_classes == "all"
    assert robustkd_config().extra["preset"] == "fst"
    assert robustkd_config().prune == "fst" and not robustkd_config().masks
    cfg = robustkd_config({"preset": "improved", "tau": 0.3})
    assert cfg.tau == 0.3 and cfg.consistency == PRESETS["improved"]["consistency"] > 0
    assert cfg.extra["preset"] == "improved"
    with pytest.raises(ConfigError, match="unknown robustkd configuration"):
        robustkd_config({"preset": "nope"})
    with pytest.raises(ConfigError, match="robustkd has no setting"):
        robustkd_config({"taux": 1})


@pytest.fixture(scope="module")
def backdoored_digits_teacher(digits):
    """A wrn10_2 digits teacher trained with a 3x3 patch backdoor to class 0 from scratch."""
    from robustkd.models import build_model

    torch.manual_seed(0)
    trig = patch_trigger(digits.train.image_size, 1, size=4)
    poisoned = poison_dataset(digits.train, trig, 0, 0.15, seed=0)
    net = build_model("wrn10_2", num_classes=10, in_channels=1)
    train_classifier(net, poisoned, None, mean=digits.mean, std=digits.std,
                     augment=digits.augment, epochs=8, optim=OptimConfig(lr=0.05,
                     schedule="cosine"), batch_size=64, progress=False, eval_every=0)
    net.eval()
    asr = attack_success_rate(net, digits.test, trig, 0, digits.mean, digits.std)
    assert asr > 0.9, asr
    return net, trig


@pytest.mark.slow
def test_trigger_synthesis_finds_the_backdoor_target(digits, backdoored_digits_teacher):
    net, _ = backdoored_digits_teacher
    found = invert_triggers(net, digits.train, mean=digits.mean, std=digits.std,
                            mask_max=0.3, epochs=3, lr=0.05, batch_size=64, progress=False)
    assert found.patterns.shape == (10, 1, 16, 16) and found.masks.max() <= 0.3 + 1e-6
    assert found.success.min() >= 0 and found.success.max() <= 1
    # the backdoor is a shortcut: its target is among the easiest classes to reach
    assert 0 in torch.topk(found.success, 3).indices.tolist(), found.success


@pytest.mark.slow
def test_trigger_consistency_changes_only_the_chosen_share(digits, backdoored_digits_teacher):
    net, _ = backdoored_digits_teacher
    found = invert_triggers(net, digits.train, mean=digits.mean, std=digits.std, epochs=1,
                            batch_size=64, progress=False)
    transform = trigger_consistency(found, 0.5, digits.mean, digits.std, seed=1)
    x = torch.randn(200, 1, 16, 16)
    y = transform(x)
    changed = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.35 < changed < 0.65
    with pytest.raises(ConfigError):
        trigger_consistency(found, 0.0, digits.mean, digits.std)


def test_removal_rate():
    assert removal_rate(0.8, 0.2) == pytest.approx(0.75)
    assert removal_rate(0.0, 0.1) is None


@pytest.mark.slow
def test_demo_writes_summary_with_every_row(tmp_path):
    settings = DemoSettings(dataset="digits", teacher_model="wrn10_1", student_model="wrn10_1",
                            teacher_epochs=1, attack_epochs=1, student_epochs=1)
    summary = run_demo(tmp_path, settings, device="cpu", progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["clean teacher", "CKD teacher",
                                                   "FKD student", "RobustKD student"]
    for row in saved["rows"]:
        assert 0 <= row["acc"] <= 1 and 0 <= row["asr"] <= 1 and row["seconds"] > 0
    assert "removal_rate" in saved
    for stage in ("teacher", "ckd-teacher", "fkd-student", "robustkd-student"):
        assert (tmp_path / stage / "record.json").exists()
    assert (tmp_path / "summary.png").stat().st_size > 1000
    text = format_summary(summary)
    assert "RobustKD student" in text and saved["verdict"] in text
    assert isinstance(saved["backdoor_reached_fkd_student"], bool)


def test_run_robustkd_with_user_modules_and_named_layers(digits):
    """The Python API path for a user's own teacher/student (no declared layers)."""
    from robustkd.data.subsets import per_class_subset
    from robustkd.defenses.robustkd import run_robustkd
    from tests.toy_models import TinyNet

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    small = per_class_subset(digits.train, per_class=20)
    cfg = robustkd_config({"preset": "improved", "tau": 0.5, "detox_epochs": 1,
                           "consistency": 0.5, "inversion_epochs": 1,
                           "inversion_classes": "all"})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = run_robustkd(teacher, student, small, None, cfg,
                          loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=32,
                                            progress=False),
                          run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)),
                          teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    assert report["layers"] == ["bn1", "bn2"] and report["masks"].names == ["bn1", "bn2"]
    assert report["inversion"]["classes"] == list(range(10))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.slow
def test_saved_detox_masks_serve_another_student(tmp_path, digits_teacher, digits):
    """A detoxified teacher (masks + synthetic triggers) is reused without retraining."""
    from robustkd.cli import main
    from robustkd.runs import run_meta, save_run_model

    teacher = tmp_path / "teacher"
    save_run_model(teacher, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    common = ["--student", "wrn10_1", "--epochs", "1", "--clean-fraction", "0.2", "--device",
              "cpu", "--no-progress", "--lr", "0.05"]
    first = tmp_path / "first"
    assert main(["distill", "--method", "robustkd", "--robustkd-preset", "improved",
                 "--teacher", str(teacher),
                 "--robustkd-tau", "0.3", "--robustkd-detox-epochs", "1",
                 "--robustkd-consistency", "0.5",
                 "--robustkd-inversion-epochs", "1",
                 "--out", str(first), *common]) == 0
    second = tmp_path / "second"
    assert main(["distill", "--method", "robustkd", "--robustkd-preset", "improved",
                 "--teacher", str(teacher),
                 "--robustkd-consistency", "0.5", "--detox-from", str(first),
                 "--out", str(second), *common]) == 0
    rec = json.loads((second / "record.json").read_text())
    assert rec["selection"] == "reused" and rec["chosen_tau"] == 0.3
    assert rec["robustkd"]["inversion"]["reused"] is True
    from safetensors.torch import load_file
    a, b = load_file(str(first / "detox.safetensors")), load_file(str(second / "detox.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["distill", "--method", "fkd", "--teacher", str(teacher), "--detox-from",
                 str(first), "--out", str(tmp_path / "x"), *common]) == 2


def test_without_masks_the_teacher_is_read_as_it_is_and_reuse_still_works(tmp_path, digits):
    """``masks false``: no detoxification (no masks trained or saved, the teacher read
    unchanged), the synthesis and consistency still run, and its saved run is reusable."""
    from robustkd.data.subsets import per_class_subset
    from robustkd.defenses.robustkd import SavedDetox, run_robustkd
    from robustkd.defenses.robustkd_transform import load_detox
    from tests.toy_models import TinyNet

    torch.manual_seed(0)
    teacher, student = TinyNet(width=16), TinyNet(width=8)
    small = per_class_subset(digits.train, per_class=20)
    cfg = robustkd_config({"masks": False, "consistency": 0.5, "inversion_epochs": 1})
    loop = LoopSettings(mean=digits.mean, std=digits.std, batch_size=32, progress=False)
    run = DistillRun(epochs=1, optim=OptimConfig(lr=0.05))
    report = run_robustkd(teacher, student, small, None, cfg, loop=loop, run=run,
                          teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"])
    assert report["masks"] is None and report["selection"] == "no masks"
    assert report["detox_seconds"] == 0.0 and report["chosen_tau"] is None
    assert report["synthetic_triggers"] is not None
    with pytest.raises(ConfigError, match="masks"):
        robustkd_config({"masks": "sometimes"})
    # a saved run without masks: load_detox gives its triggers and no masks
    from robustkd.io import save_tensors, write_json
    save_tensors(tmp_path / "detox.safetensors", report["synthetic_triggers"].tensors())
    write_json(tmp_path / "detox.json", {"config": cfg.as_dict()})
    masks, triggers = load_detox(tmp_path)
    assert masks is None and triggers.classes.tolist() == report["inversion"]["used_classes"]
    again = run_robustkd(teacher, TinyNet(width=8), small, None, cfg, loop=loop, run=run,
                         teacher_layers=["bn1", "bn2"], student_layers=["bn1", "bn2"],
                         reuse=SavedDetox(masks, triggers))
    assert again["inversion"]["reused"] is True and again["masks"] is None


def test_suspect_classes_pick_the_outlying_success():
    from robustkd.defenses.inversion import robust_z, suspect_classes

    # the mini CKD teacher's per-class success at blend budget 0.1 (target 0)
    success = torch.tensor([0.993, 0.183, 0.261, 0.206, 0.449, 0.201, 0.582, 0.576, 0.427,
                            0.296])
    # torch's median of an even count is the lower middle value: median 0.296,
    # MAD 0.113 -> z(0.993) = 0.697 / (1.4826 * 0.113)
    assert robust_z(success)[0].item() == pytest.approx(0.697 / (1.4826 * 0.113), rel=1e-3)
    assert suspect_classes(success) == [0]
    # nothing stands out: still the most successful one; two outliers: both
    assert suspect_classes(torch.tensor([0.3, 0.32, 0.31, 0.35, 0.29])) == [3]
    assert suspect_classes(torch.tensor([0.99, 0.2, 0.21, 0.22, 0.98, 0.2, 0.19])) == [0, 4]
    # near-zero spread (the digits demo): 1.7% vs 0.1% is noise, only the target stands out
    demo = torch.tensor([1.0, 0.017, 0.0008, 0.0039, 0.0, 0.0023, 0.0, 0.0008, 0.0154, 0.0008])
    assert suspect_classes(demo) == [0]


@pytest.mark.slow
def test_suspects_config_keeps_only_those_triggers(digits, backdoored_digits_teacher):
    from robustkd.defenses.robustkd import run_robustkd
    from robustkd.models import build_model

    net, _ = backdoored_digits_teacher
    cfg = robustkd_config({"preset": "improved", "detox_epochs": 1, "inversion_epochs": 2,
                           "inversion_mask_max": 0.3})
    assert cfg.inversion_classes == "suspects"
    student = build_model("wrn10_1", num_classes=10, in_channels=1)
    report = run_robustkd(net, student, digits.train, None, cfg,
                          loop=LoopSettings(mean=digits.mean, std=digits.std, batch_size=64,
                                            progress=False),
                          run=DistillRun(epochs=1, optim=OptimConfig(lr=0.05)))
    inv = report["inversion"]
    used = inv["used_classes"]
    assert 1 <= len(used) < 10 and len(inv["robust_z"]) == 10
    best = max(range(10), key=lambda k: inv["success"][k])
    assert best in used
    assert report["synthetic_triggers"].classes.tolist() == used


def test_success_is_scored_on_a_bounded_balanced_sample():
    from robustkd.data.dataset import ImageDataset
    from robustkd.defenses.inversion import SUCCESS_FORWARDS, success_sample

    def fake(classes: int, per_class: int) -> ImageDataset:
        labels = torch.arange(classes).repeat_interleave(per_class)
        return ImageDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels,
                            [str(c) for c in range(classes)])

    cifar_like = fake(10, 500)  # the measured CIFAR setting fits: every image is kept
    assert success_sample(cifar_like, 10) is cifar_like
    gtsrb_like = fake(43, 76)  # 3,268 images x 43 triggers would be 140k forwards
    sample = success_sample(gtsrb_like, 43)
    assert len(sample) * 43 <= SUCCESS_FORWARDS * 1.05
    assert len(sample) >= 0.9 * SUCCESS_FORWARDS // 43
    counts = torch.bincount(sample.labels, minlength=43)
    assert counts.min() >= counts.max() - 1  # class-balanced
