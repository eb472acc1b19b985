"""CUDA paths (skipped without a GPU): device loader, AMP + channels_last training, triggers,
FKD distillation and detox masks on the device."""

import pytest
import torch

from robustkd.attacks import patch_trigger
from robustkd.data.dataset import ImageDataset
from robustkd.data.loader import DeviceLoader
from robustkd.defenses.detox import train_detox_masks
from robustkd.defenses.robustkd import RobustKDConfig
from robustkd.distill import DistillRun, distill_student
from robustkd.models import build_model
from robustkd.training.classifier import train_classifier
from robustkd.training.loop_settings import LoopSettings
from robustkd.training.optim import OptimConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _toy(n=256):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 100, (n, 3, 32, 32), generator=gen)
    images[torch.arange(n), labels % 3, :8] += 120  # class-dependent bright band
    return ImageDataset(images.clamp(0, 255).to(torch.uint8), labels, list("abcd"))


def test_loader_same_batches_on_cpu_and_cuda():
    ds = _toy()
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3,
              augment={"kind": "crop", "pad": 4, "flip": True})
    cpu = next(iter(DeviceLoader(ds, 32, device="cpu", **kw)))
    gpu = next(iter(DeviceLoader(ds, 32, device="cuda", channels_last=True, **kw)))
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-6)
    assert gpu[0].is_contiguous(memory_format=torch.channels_last)


def test_amp_channels_last_training_learns():
    ds = _toy()
    model = build_model("wrn10_1", num_classes=4).cuda().to(memory_format=torch.channels_last)
    hist = train_classifier(model, ds, ds, mean=(0.5,) * 3, std=(0.25,) * 3, augment=None,
                            epochs=4, optim=OptimConfig(lr=0.05, schedule="cosine"),
                            batch_size=64, device="cuda", channels_last=True, amp=True,
                            progress=False, eval_every=4)
    assert hist[-1].loss < hist[0].loss and hist[-1].extra["test_acc"] > 0.5


def test_trigger_fkd_and_detox_on_cuda():
    ds = _toy()
    trig = patch_trigger((32, 32), 3).cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    assert trig.apply(x).device.type == "cuda"
    teacher = build_model("wrn10_2", num_classes=4).cuda()
    student = build_model("wrn10_1", num_classes=4).cuda()
    loop = LoopSettings(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=64, device="cuda",
                        progress=False)
    hist, _ = distill_student(teacher, student, ds, ds, loop=loop,
                              run=DistillRun(epochs=1, trigger=trig, target=0))
    assert "test_asr" in hist[-1].extra
    masks, _ = train_detox_masks(teacher, ds, ["block1", "block3"],
                                 RobustKDConfig(detox_epochs=1).detox(0.2), loop)
    assert masks.masks[0].device.type == "cuda"
