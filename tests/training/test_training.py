"""The one training loop: schedules, learning, resumption."""

import pytest
import torch

from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.errors import ConfigError
from robustkd.models import build_model
from robustkd.training.classifier import classification_step
from robustkd.training.loop import fit
from robustkd.training.optim import OptimConfig, build_optimizer, lr_factor

MEAN, STD = (0.5,), (0.25,)


def _toy(n=64, size=8, seed=0):
    """Two classes that differ in brightness of the left half: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 128, (n, 1, size, size), generator=gen)
    images[labels == 1, :, :, : size // 2] += 100
    return ImageDataset(images.to(torch.uint8), labels, ["dark", "bright"])


def test_step_schedule_divides_at_half_and_three_quarters():
    cfg = OptimConfig(schedule="step")
    factors = [lr_factor(e, 0, 10, 8, cfg) for e in range(8)]
    assert factors == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_moves_per_step_and_ends_near_zero():
    cfg = OptimConfig(schedule="cosine")
    assert lr_factor(0, 0, 10, 4, cfg) == pytest.approx(1.0)
    assert lr_factor(2, 0, 10, 4, cfg) == pytest.approx(0.5)
    assert lr_factor(3, 9, 10, 4, cfg) < 0.01
    assert lr_factor(0, 5, 10, 4, cfg) < lr_factor(0, 4, 10, 4, cfg)


def test_unknown_optimizer_is_config_error():
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build_optimizer([torch.zeros(1, requires_grad=True)], OptimConfig(name="lion"))


def _run(model, epochs, state_dir=None, resume=False, seed=0, on_epoch_end=None):
    ds = _toy()
    loader = DeviceLoader(ds, 16, mean=MEAN, std=STD, shuffle=True, seed=seed,
                          augment={"kind": "crop", "pad": 1, "flip": True})
    return fit(model.parameters(), classification_step(model), loader, epochs,
               OptimConfig(name="sgd", lr=0.05, schedule="cosine"), train_modules=[model],
               state_modules={"model": model}, state_dir=state_dir, resume=resume,
               progress=False, on_epoch_end=on_epoch_end)


def test_loss_decreases_and_train_accuracy_rises():
    torch.manual_seed(0)
    model = build_model("wrn10_1", num_classes=2, in_channels=1)
    history = _run(model, 6)
    assert history[-1].loss < 0.7 * history[0].loss
    assert history[-1].stats["train_acc"] > 0.9
    assert all(h.images == 64 for h in history)


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    torch.manual_seed(0)
    straight = build_model("wrn10_1", num_classes=2, in_channels=1)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    full = _run(straight, 3)

    interrupted = build_model("wrn10_1", num_classes=2, in_channels=1)
    interrupted.load_state_dict(start)

    def kill_during_epoch_two(result):
        if result.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(interrupted, 3, state_dir=tmp_path, on_epoch_end=kill_during_epoch_two)
    resumed_model = build_model("wrn10_1", num_classes=2, in_channels=1)  # fresh process
    resumed = _run(resumed_model, 3, state_dir=tmp_path, resume=True)
    assert [h.epoch for h in resumed] == [1, 2, 3]
    for key, value in straight.state_dict().items():
        assert torch.allclose(value.float(), resumed_model.state_dict()[key].float(),
                              atol=1e-5), key
    assert resumed[-1].loss == pytest.approx(full[-1].loss, rel=1e-4)


def test_bf16_is_in_effect_on_cuda_and_on_cpus_with_native_bf16_only():
    from robustkd.training.loop import bf16_in_effect, cpu_has_bf16

    assert bf16_in_effect(torch.device("cuda"), True)
    assert not bf16_in_effect(torch.device("cuda"), False)
    assert bf16_in_effect(torch.device("cpu"), True) == cpu_has_bf16()
    assert not bf16_in_effect(torch.device("cpu"), False)
