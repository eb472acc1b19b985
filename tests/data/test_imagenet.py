"""Larger-image support: ImageNet ResNets and MobileNetV2, torchvision/timm models through the
feature taps, and ImageNet-style data streamed from disk by worker processes."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustkd.data import load_dataset
from robustkd.data.streaming import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StreamedImageFolder,
    StreamLoader,
    center_box,
    load_streamed,
    random_resized_box,
)
from robustkd.distill import build_distiller
from robustkd.errors import ConfigError, DataError
from robustkd.models import DistillLayer, build_model, count_parameters, list_models
from robustkd.models.layers import frozen_teacher
from robustkd.models.taps import disable_inplace, tap
from robustkd.training.loop import fit
from robustkd.training.optim import OptimConfig

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TINY = SHARED / "tinyimagenet200.tar.gz"

# Parameter counts on 1000 classes of the reference ImageNet implementations.
REFERENCE_PARAMS = {
    "imagenet_resnet18": 11_689_512,
    "imagenet_resnet34": 21_797_672,
    "imagenet_resnet50": 25_557_032,
    "mobilenetv2": 3_504_872,
}


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name):
    assert count_parameters(build_model(name, num_classes=1000)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize(
    ("name", "kwargs", "channels", "size"),
    [
        ("imagenet_resnet18", {}, [64, 128, 256, 512], 128),
        ("imagenet_resnet50", {}, [256, 512, 1024, 2048], 128),
        ("mobilenetv2", {}, [24, 32, 96, 1280], 128),
        ("mobilenetv2", {"width_mult": 0.5}, [16, 16, 48, 1280], 128),
        ("imagenet_resnet18", {"small_input": True}, [64, 128, 256, 512], 32),
        ("mobilenetv2", {"small_input": True}, [24, 32, 96, 1280], 32),
    ],
)
def test_distill_layers_of_imagenet_models(name, kwargs, channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs).eval()
    layers = model.distill_layers()
    assert len(layers) == 4 and all(isinstance(d, DistillLayer) for d in layers)
    modules = dict(model.named_modules())
    for d in layers:
        assert d.stage in modules and d.prerelu in modules
        assert isinstance(modules[d.bn], nn.BatchNorm2d)
    names = [n for d in layers for n in (d.stage, d.prerelu)]
    with torch.no_grad(), tap(model, names) as t:
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert [t[d.stage].shape[1] for d in layers] == channels
    # strides 4, 8, 16, 32 (ImageNet stem) or 1, 2, 4, 8 (small_input)
    first = size // 4 if size > 32 else size
    assert [t[d.stage].shape[-1] for d in layers] == [first // 2**i for i in range(4)]
    for d in layers:
        pre = t[d.prerelu]  # raises if an in-place op changed it after the hook
        assert (pre < 0).any(), f"{d.prerelu}: no negative responses"
        assert pre.shape == t[d.stage].shape
        assert modules[d.bn].num_features == pre.shape[1]


def test_imagenet_models_in_registry():
    names = list_models()
    assert {"imagenet_resnet18", "imagenet_resnet50", "mobilenetv2"} <= set(names)
    assert type(build_model("resnet50", num_classes=10)).__name__ == "CifarResNet"  # unchanged
    with pytest.raises(ConfigError, match="imagenet_resnet18"):
        build_model("resnet18", num_classes=10)  # the CIFAR family points at the ImageNet one
    with pytest.raises(ConfigError, match="18, 34, 50, 101, 152"):
        build_model("imagenet_resnet20", num_classes=10)
    with pytest.raises(ConfigError, match="width_mult"):
        build_model("mobilenetv2", num_classes=10, width_mult=0)
    model = build_model("mobilenetv2", num_classes=7, in_channels=1, width_mult=0.75)
    stored = json.loads(json.dumps({"arch": model.arch, "kwargs": model.arch_kwargs}))
    again = build_model(stored["arch"], **stored["kwargs"])
    assert count_parameters(again) == count_parameters(model)
    assert model.classifier_name == "classifier.1"
    assert model.get_submodule(model.classifier_name).out_features == 7
    resnet = build_model("imagenet_resnet50", num_classes=10)
    keys = resnet.state_dict().keys()
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.2.bn3.running_var",
            "fc.bias"} <= set(keys)


def test_resnet50_to_mobilenetv2_fkd_at_224_layout():
    """4 points each, equal resolutions: FKD pairs them without naming layers."""
    torch.manual_seed(0)
    teacher = build_model("imagenet_resnet50", num_classes=5)
    student = build_model("mobilenetv2", num_classes=5, width_mult=0.5)
    d = build_distiller("fkd", teacher, student)
    x = torch.randn(2, 3, 64, 64)
    with frozen_teacher(teacher, "train"):
        d.prepare(x)
        loss, _ = d.loss(x, torch.tensor([0, 4]))
    loss.backward()
    assert [c[0].weight.shape[:2] for c in d.connectors] == [
        (256, 16), (512, 16), (1024, 48), (2048, 1280)]


# --------------------------------------------------------------------------- foreign models


class PostActBlock(nn.Module):
    """The torchvision/timm ResNet block pattern: in-place add and in-place ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class PostActNet(nn.Module):
    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(PostActBlock(c))
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), PostActBlock(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def test_taps_refuse_features_changed_in_place():
    torch.manual_seed(0)
    net, x = PostActNet(), torch.randn(2, 3, 8, 8)
    with tap(net, ["layer1.0.bn2", "stem.1", "layer1"]) as t:
        net(x)
    with pytest.raises(ConfigError, match="changed in place"):
        t["layer1.0.bn2"]  # `out += x` and the in-place ReLU overwrote it
    with pytest.raises(ConfigError, match="disable_inplace"):
        t["stem.1"]
    assert (t["layer1"] >= 0).all()  # stage outputs are left alone
    assert disable_inplace(net) == 3
    with tap(net, ["stem.1"]) as t:
        net(x)
    assert (t["stem.1"] < 0).any()  # a real pre-ReLU feature now


def test_fkd_on_foreign_post_activation_models_via_stage_names():
    torch.manual_seed(0)
    teacher, student = PostActNet(16), PostActNet(8)
    d = build_distiller("fkd", teacher, student, teacher_layers=["layer1", "layer2"],
                        student_layers=["layer1", "layer2"])
    x = torch.randn(4, 3, 8, 8)
    with frozen_teacher(teacher, "train"):
        d.prepare(x)
        loss, stats = d.loss(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and stats["feat_loss"] > 0
    assert all(layer.bn is None for layer in d.setup.teacher_layers)  # margins measured


def _foreign(lib: str, name: str, classes: int) -> nn.Module:
    if lib == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=classes)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=classes)


FOREIGN_STAGES = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v2": ["features.3", "features.6", "features.13", "features.18.1"],
}


@pytest.mark.parametrize(
    ("lib", "teacher_name", "student_name"),
    [("torchvision", "resnet50", "resnet18"), ("torchvision", "resnet50", "mobilenet_v2"),
     ("timm", "resnet50", "resnet18")],
)
def test_foreign_models_distil_through_taps(lib, teacher_name, student_name):
    """torchvision/timm models (optional packages: skipped when absent) as teacher/student."""
    if importlib.util.find_spec(lib) is None:
        pytest.skip(f"{lib} is not installed (optional)")
    torch.manual_seed(0)
    teacher = _foreign(lib, teacher_name, 10)
    student = _foreign(lib, student_name, 10)
    disable_inplace(student)  # MobileNetV2's head BN (features.18.1) is followed by ReLU6
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller("fkd", teacher, student, teacher_layers=FOREIGN_STAGES[teacher_name],
                        student_layers=FOREIGN_STAGES[student_name])
    x = torch.randn(2, 3, 64, 64)
    with frozen_teacher(teacher, "train"):
        d.prepare(x)
        loss, _ = d.loss(x, torch.tensor([0, 9]))
    loss.backward()
    assert torch.isfinite(loss)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])
    if lib == "torchvision":  # the last block's BN is overwritten by `out += identity`
        with tap(teacher, ["layer4.2.bn3"]) as t:
            teacher.eval()(x)
        with pytest.raises(ConfigError, match="changed in place"):
            t["layer4.2.bn3"]


# --------------------------------------------------------------------------- streamed data


WANTED = 3  # classes taken from the Tiny-ImageNet archive


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """DATA_ROOT/imagenet/{train,val}/<wnid>/ from a few Tiny-ImageNet images (64x64 JPEGs),
    plus one larger greyscale JPEG and one palette PNG to exercise the decoder's paths."""
    if not TINY.is_file():
        pytest.skip(f"{TINY} not present")
    root = tmp_path_factory.mktemp("data")
    per_split = {"train": 4, "test": 2}
    taken: dict[tuple[str, str], int] = {}
    classes: list[str] = []
    with tarfile.open(TINY, "r|gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4:
                continue
            _, split, wnid, fname = parts
            if wnid not in classes:
                if len(classes) == WANTED:
                    if split == "train":
                        break
                    continue
                classes.append(wnid)
            if taken.get((split, wnid), 0) >= per_split[split]:
                continue
            taken[(split, wnid)] = taken.get((split, wnid), 0) + 1
            out = root / "imagenet" / ("val" if split == "test" else "train") / wnid / fname
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(member).read())
            if len(taken) == 2 * WANTED and all(
                    taken[(s, c)] == per_split[s] for s, c in taken):
                break
    grey = Image.fromarray(np.tile(np.arange(160, dtype=np.uint8), (120, 1)), "L")
    grey.save(root / "imagenet" / "train" / classes[0] / "zz_grey.JPEG", quality=90)
    pal = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    pal.convert("P").save(root / "imagenet" / "train" / classes[1] / "zz_palette.png")
    return root


def test_load_dataset_points_imagenet_to_streaming(tmp_path):
    with pytest.raises(DataError, match="load_streamed"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="sorted into class folders"):
        load_streamed("imagenet", tmp_path)


def test_streamed_folder_lists_classes_and_decodes_lazily(imagenet_root):
    splits = load_streamed("imagenet", imagenet_root, crop_size=32)
    train, val = splits.train, splits.test
    assert splits.num_classes == WANTED and val.classes == train.classes
    assert sorted(train.classes) == train.classes
    assert len(train) == 4 * WANTED + 2 and len(val) == 2 * WANTED
    assert train.labels.tolist() == sorted(train.labels.tolist())
    assert (splits.mean, splits.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert train.resize_size == 37 and train.image_size == (32, 32)
    for ds in (train, val):
        for i in range(len(ds)):
            img, label, idx = ds[(i, 123)]
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert label == int(ds.labels[i]) and idx == i
    # the train transform is random per seed but reproducible; the eval one is fixed
    a, b = train[(0, 1)][0], train[(0, 1)][0]
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, train[(0, s)][0]) for s in range(2, 6))
    assert np.array_equal(val[(0, 1)][0], val[(0, 2)][0])


def test_eval_transform_is_resize_then_centre_crop(imagenet_root):
    ds = StreamedImageFolder(imagenet_root / "imagenet" / "val", train=False, crop_size=48,
                             resize_size=56)
    got = ds.load(0).astype(np.float32)
    with Image.open(ds.path(0)) as im:
        im = im.convert("RGB").resize((56, 56), Image.Resampling.BILINEAR)  # 64x64 source
        ref = np.asarray(im.crop((4, 4, 52, 52)), dtype=np.float32)
    assert np.abs(got - ref).mean() < 4.0


def test_draft_decoding_matches_full_decoding(tmp_path):
    """JPEG DCT-domain downscaling (draft) is only a speed-up: same picture."""
    yy, xx = np.mgrid[0:480, 0:640]
    rgb = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1)
    folder = tmp_path / "split" / "cls"
    folder.mkdir(parents=True)
    Image.fromarray(rgb.astype(np.uint8)).save(folder / "a.jpg", quality=95)
    kw = {"crop_size": 64, "resize_size": 73}
    for train in (False, True):
        fast = StreamedImageFolder(tmp_path / "split", train=train, draft=True, **kw)
        slow = StreamedImageFolder(tmp_path / "split", train=train, draft=False, **kw)
        for seed in range(3):
            diff = np.abs(fast.load(0, seed).astype(int) - slow.load(0, seed).astype(int))
            assert diff.mean() < 2.0, (train, seed, diff.mean())


def test_random_resized_box_rules():
    import random

    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(300, 200, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        w, h = right - left, bottom - top
        assert left >= 0 and top >= 0 and right <= 300 and bottom <= 200
        assert 0.08 * 0.9 <= w * h / 60000 <= 1.0
    # impossible ratio: falls back to the largest centred crop of the closest ratio
    assert random_resized_box(100, 10, (0.9, 1.0), (1.0, 1.0), rng) == (45, 0, 55, 10)
    assert center_box(320, 240, 224, 256) == pytest.approx((55, 15, 265, 225))


def test_stream_loader_batches_match_device_loader_contract(imagenet_root):
    splits = load_streamed("imagenet", imagenet_root, crop_size=32)
    serial = splits.loader("train", 4, workers=0, seed=3)
    assert serial.drop_last and len(serial) == (4 * WANTED + 2) // 4
    batches = list(serial)
    x, y, idx = batches[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and x.is_contiguous()
    assert y.dtype == torch.int64 and idx.dtype == torch.int64 and idx.device.type == "cpu"
    assert torch.equal(y, splits.train.labels[idx])
    assert torch.equal(idx, serial.order(0)[:4])
    # each image is its own seeded crop, normalised with the ImageNet statistics
    order, seeds = serial._sampler.draw(0)
    raw = torch.from_numpy(np.stack([splits.train[(int(i), int(s))][0]
                                     for i, s in zip(order[:4], seeds[:4], strict=True)]))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (raw.permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5)
    # worker processes give exactly the same batches (per-sample seeds, not per-worker)
    parallel = splits.loader("train", 4, workers=2, seed=3, channels_last=True)
    for (xa, ya, ia), (xb, yb, ib) in zip(batches, parallel, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.allclose(xa, xb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
    # epochs differ; set_epoch replays one
    second = [b[2] for b in serial]
    assert not all(torch.equal(a[2], b) for a, b in zip(batches, second, strict=True))
    serial.set_epoch(0)
    assert all(torch.allclose(a[0], b[0]) for a, b in zip(batches, serial, strict=True))
    # evaluation: ordered, every image once, fixed transform
    ev = splits.loader("test", 4, workers=0)
    seen = torch.cat([b[2] for b in ev])
    assert seen.tolist() == list(range(len(splits.test)))
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    first = next(iter(ev))[0]
    for c in range(3):
        assert lo[c] - 1e-5 <= first[:, c].min() and first[:, c].max() <= hi[c] + 1e-5


def test_fit_trains_on_a_stream_loader(imagenet_root):
    """The one training loop consumes a StreamLoader like a DeviceLoader."""
    splits = load_streamed("imagenet", imagenet_root, crop_size=32)
    torch.manual_seed(0)
    model = build_model("wrn10_1", num_classes=splits.num_classes)
    loader = StreamLoader(splits.train, 7, shuffle=True, drop_last=True, workers=2)
    history = fit(model.parameters(),
                  lambda x, y, _i: nn.functional.cross_entropy(model(x), y), loader, 2,
                  OptimConfig(lr=0.01, schedule="constant"), train_modules=[model],
                  progress=False)
    assert [h.images for h in history] == [14, 14]
    assert all(np.isfinite(h.loss) for h in history)


def test_stream_reports_undecodable_files(tmp_path):
    folder = tmp_path / "split" / "cls"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("RGB", (10, 10)).save(folder / "ok.png")
    (folder / "notes.txt").write_text("ignored")
    ds = StreamedImageFolder(tmp_path / "split", train=False, crop_size=8)
    assert len(ds) == 2
    with pytest.raises(DataError, match="broken.jpg: cannot decode"):
        ds.load(0)
    assert ds.load(1).shape == (8, 8, 3)
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        StreamedImageFolder(tmp_path / "empty", train=True)
    with pytest.raises(ConfigError, match="resize_size"):
        StreamedImageFolder(tmp_path / "split", train=False, crop_size=8, resize_size=4)
