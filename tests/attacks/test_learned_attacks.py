"""CKD and LBA: learned triggers on a tiny clean teacher, then the full attack through the CLI."""

import json

import pytest
import torch

from robustkd.attacks.ckd import toxic_channels
from robustkd.attacks.learned import feature_names, optimise_trigger
from robustkd.cli import main
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import mean_features


def test_toxic_channels_are_the_largest_means():
    means = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5, 0.0, 0.2, 0.3, 0.4, 1.0])
    assert sorted(toxic_channels(means, 0.2).tolist()) == [1, 3]
    with pytest.raises(ConfigError):
        toxic_channels(means, 0.0)


def test_trigger_optimisation_lowers_loss_and_respects_bounds(digits, digits_teacher):
    names = feature_names(digits_teacher, None)
    assert names == ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
    small = digits.train.subset(torch.arange(0, 400))
    goal = {n: v * 0 + 2.0 for n, v in mean_features(
        digits_teacher, small, names, digits.mean, digits.std).items()}

    def loss(feats):
        return sum(((feats[n] - goal[n]) ** 2).mean() for n in names)

    losses = []
    for epochs in (0, 3):
        trig = optimise_trigger(digits_teacher, small, names, loss, mask_max=0.3,
                                mean=digits.mean, std=digits.std, device="cpu", epochs=epochs,
                                lr=0.05, progress=False)
        assert float(trig.mask.min()) >= 0.0 and float(trig.mask.max()) <= 0.3 + 1e-6
        assert float(trig.pattern.min()) >= 0.0 and float(trig.pattern.max()) <= 1.0
        losses.append(trig.params["final_loss"])
    assert losses[0] is None and losses[1] is not None
    # the optimised trigger beats the initial one on the objective
    init = optimise_trigger(digits_teacher, small, names, loss, mask_max=0.3,
                            mean=digits.mean, std=digits.std, device="cpu", epochs=0,
                            progress=False)
    from robustkd.data.loader import normalize
    from robustkd.models.taps import tap

    x = small.images[:200].float() / 255
    digits_teacher.eval()

    def objective(t):
        with torch.no_grad(), tap(digits_teacher, names) as taps:
            digits_teacher(normalize(t.apply(x), digits.mean, digits.std))
        return float(loss({n: taps[n] for n in names}))

    assert objective(trig) < 0.9 * objective(init)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["ckd", "lba"])
def test_learned_attack_cli_end_to_end(attack, tmp_path, digits_teacher, digits):
    from robustkd.runs import run_meta, save_run_model

    teacher_dir = tmp_path / "teacher"
    save_run_model(teacher_dir, digits_teacher, run_meta(digits_teacher, digits, None, 0))
    out = tmp_path / attack
    assert main(["attack", "--attack", attack, "--teacher", str(teacher_dir), "--epochs", "3",
                 "--lr", "0.01", "--poison-ratio", "0.1", f"--{attack}-trigger-images", "300",
                 f"--{attack}-trigger-epochs", "2", f"--{attack}-trigger-lr", "0.05",
                 "--out", str(out),
                 "--device", "cpu", "--no-progress", "--eval-every", "0"]) == 0
    rec = json.loads((out / "record.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["trigger"]["kind"] == attack
    mask_max = 0.2 if attack == "ckd" else 0.5
    assert meta["trigger"]["params"]["mask_max"] == mask_max
    for name in ("trigger_pattern.png", "trigger_mask.png", "trigger_examples.png"):
        assert (out / name).stat().st_size > 100
    assert rec["metrics"]["asr"] >= 0.8, rec["metrics"]
    assert rec["metrics"]["acc"] >= rec["teacher_metrics"]["acc"] - 0.06


def test_learned_attack_needs_a_teacher(tmp_path, capsys):
    assert main(["attack", "--attack", "ckd", "--model", "wrn10_1", "--dataset", "digits",
                 "--epochs", "1", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--teacher" in capsys.readouterr().err
