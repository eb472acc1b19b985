"""Tests of the data layer: readers, cache, subsets, loader (all on generated data)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustkd.data import (
    DatasetSplits,
    DeviceLoader,
    ImageDataset,
    cifar,
    fractals,
    imagefolder,
    list_datasets,
    load_dataset,
    normalize,
    per_class_subset,
    registry,
    split_validation,
    synthetic,
)
from robustkd.data import cache as cache_mod
from robustkd.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own dataset cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTKD_CACHE_DIR", str(folder))
    return folder


# --------------------------------------------------------------------------- helpers


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(rng: np.random.Generator, n: int, h: int = 8, w: int = 8, c: int = 3) -> np.ndarray:
    shape = (n, h, w, c) if c > 1 else (n, h, w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _make_folder_tree(root: Path, spec: dict[str, dict[str, list[np.ndarray]]]) -> None:
    """Write ``root/<split>/<class>/img_<k>.png`` for ``spec[split][class] = [arrays]``."""
    for split, classes in spec.items():
        for cls, arrays in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k, arr in enumerate(arrays):
                (d / f"img_{k:03d}.png").write_bytes(_png(arr))


def _tar_folder(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return archive


def _spec(rng: np.random.Generator, classes=("b_cls", "a_cls", "c"), n_train=3, n_test=2):
    return {
        "train": {c: list(_images(rng, n_train)) for c in classes},
        "test": {c: list(_images(rng, n_test)) for c in classes},
    }


def _expected(spec, split: str) -> tuple[np.ndarray, list[int], list[str]]:
    classes = sorted(spec[split])
    imgs, labels = [], []
    for i, c in enumerate(classes):
        for arr in spec[split][c]:
            imgs.append(arr if arr.ndim == 3 else arr[:, :, None])
            labels.append(i)
    return np.stack(imgs).transpose(0, 3, 1, 2), labels, classes


def _tar_with(archive: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A .tar.gz with the given members (``None`` data = a directory entry)."""
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return archive


# --------------------------------------------------------------------------- CIFAR


def _write_cifar10(folder: Path, rng: np.random.Generator, per_batch: int = 4):
    """Official CIFAR-10 layout, pickled like the original (bytes keys, protocol 2)."""
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        d = {
            b"batch_label": b"training batch",
            b"labels": y,
            b"data": x,
            b"filenames": [b"f%d.png" % k for k in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=2))
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    ty = [9, 0, 4]
    d = {b"batch_label": b"testing batch", b"labels": ty, b"data": tx}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    names = [f"class{k}".encode() for k in range(10)]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(train_x), train_y, tx, ty


def test_cifar10_archive_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    trx, try_, tex, tey = _write_cifar10(src / "cifar-10-batches-py", rng)
    root = tmp_path / "root"
    root.mkdir()
    _tar_folder(src / "cifar-10-batches-py", root / "cifar-10-python.tar.gz", "cifar-10-batches-py")

    splits = load_dataset("cifar10", root)
    assert isinstance(splits, DatasetSplits)
    assert splits.classes == [f"class{k}" for k in range(10)]
    assert torch.equal(splits.train.images, torch.from_numpy(trx.reshape(-1, 3, 32, 32)))
    assert splits.train.labels.tolist() == try_
    assert torch.equal(splits.test.images, torch.from_numpy(tex.reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == tey
    assert splits.augment == {"kind": "crop", "pad": 4, "flip": True}

    # the extracted folder reads the same
    train, test = cifar.read_cifar("cifar10", src)
    assert torch.equal(train.images, splits.train.images)
    assert torch.equal(test.labels, splits.test.labels)


def test_cifar100_fine_labels_str_keys(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = [f // 5 for f in fine]
        d = {"data": x, "fine_labels": fine, "coarse_labels": coarse, "filenames": ["a"] * n}
        (folder / split).write_bytes(pickle.dumps(d, protocol=5))
        data[split] = (x, fine)
    meta = {
        "fine_label_names": [f"f{k:02d}" for k in range(100)],
        "coarse_label_names": [f"c{k}" for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    archive = _tar_folder(folder, tmp_path / "cifar-100-python.tar.gz", "cifar-100-python")

    train, test = cifar.read_cifar("cifar100", archive)
    assert train.num_classes == 100 and train.classes[3] == "f03"
    assert torch.equal(train.images, torch.from_numpy(data["train"][0].reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == data["train"][1]
    assert test.labels.tolist() == data["test"][1]

    splits = load_dataset("cifar100", tmp_path, cache=False)
    assert splits.num_classes == 100 and len(splits.test) == 5


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(2))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))  # the payload works with plain pickle ...
    assert control.exists()

    target = tmp_path / "pwned"
    evil = {b"data": _Evil(target), b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="system") as err:
        cifar.read_cifar("cifar10", folder)
    assert "data_batch_3" in str(err.value)
    assert not target.exists()  # ... but not with ours

    with pytest.raises(DataError):
        cifar.restricted_loads(pickle.dumps(_Evil(target), protocol=5))
    with pytest.raises(DataError):
        cifar.restricted_loads(pickle.dumps(collections.OrderedDict(a=1), protocol=4))
    assert not target.exists()
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    for proto in (2, 4, 5):
        out = cifar.restricted_loads(pickle.dumps({"a": arr, "s": np.float32(1.5)}, protocol=proto))
        assert np.array_equal(out["a"], arr) and out["s"] == np.float32(1.5)


def test_download_cifar_checksum(tmp_path, monkeypatch):
    payload = b"pretend this is the CIFAR-10 archive" * 1000
    info = cifar.CIFAR_ARCHIVES["cifar10"]
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(cifar.urllib.request, "urlopen", fake_urlopen)
    good = dataclasses.replace(info, md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(cifar.CIFAR_ARCHIVES, "cifar10", good)
    root = tmp_path / "dl"
    path = cifar.download_cifar("cifar10", root)
    assert path == root / info.filename and path.read_bytes() == payload
    assert calls == [info.url]
    assert sorted(p.name for p in root.iterdir()) == [info.filename]
    cifar.download_cifar("cifar10", root)  # present with the right md5: no second fetch
    assert len(calls) == 1

    bad = dataclasses.replace(info, md5="0" * 32)
    monkeypatch.setitem(cifar.CIFAR_ARCHIVES, "cifar10", bad)
    root2 = tmp_path / "dl2"
    with pytest.raises(DataError, match="md5 mismatch"):
        cifar.download_cifar("cifar10", root2)
    assert list(root2.iterdir()) == []  # temp file removed, nothing renamed into place


# --------------------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("kind", ["tar", "dir"])
def test_imagefolder_roundtrip(tmp_path, kind):
    rng = np.random.default_rng(3)
    spec = _spec(rng)
    _make_folder_tree(tmp_path / "toy", spec)
    if kind == "tar":
        root = tmp_path / "root"
        root.mkdir()
        _tar_folder(tmp_path / "toy", root / "toy.tar.gz", "toy")
        (tmp_path / "toy" / "train").rename(tmp_path / "gone")  # only the tar remains usable
    else:
        root = tmp_path
    splits = load_dataset("toy", root)
    for split, ds in (("train", splits.train), ("test", splits.test)):
        images, labels, classes = _expected(spec, split)
        assert ds.classes == classes == ["a_cls", "b_cls", "c"]
        assert torch.equal(ds.images, torch.from_numpy(images))
        assert ds.labels.tolist() == labels
    assert splits.name == "toy"
    assert splits.augment == {"kind": "crop", "pad": 1, "flip": True}


def test_imagefolder_pool_path(tmp_path, monkeypatch):
    """The multiprocessing decoder gives the same result and names corrupt files."""
    monkeypatch.setattr(imagefolder, "_POOL_MIN_IMAGES", 4)
    monkeypatch.setattr(imagefolder, "_CHUNK", 3)
    rng = np.random.default_rng(4)
    spec = _spec(rng, n_train=5, n_test=3)
    _make_folder_tree(tmp_path / "toy", spec)
    archive = _tar_folder(tmp_path / "toy", tmp_path / "toy.tar.gz", "toy")
    train, test = imagefolder.read_imagefolder(archive, workers=2)
    images, labels, _ = _expected(spec, "train")
    assert torch.equal(train.images, torch.from_numpy(images))
    assert train.labels.tolist() == labels
    train_dir, _ = imagefolder.read_imagefolder(tmp_path / "toy", workers=2)
    assert torch.equal(train_dir.images, train.images)

    (tmp_path / "toy" / "test" / "c" / "img_001.png").write_bytes(b"garbage, not a PNG")
    with pytest.raises(DataError, match=r"test/c/img_001\.png"):
        imagefolder.read_imagefolder(tmp_path / "toy", workers=2)


def test_imagefolder_tar_without_pax_uses_fallback(tmp_path):
    """GNU/pax archives (long names) go through tarfile and read the same."""
    rng = np.random.default_rng(5)
    spec = _spec(rng, classes=("x" * 120, "y"), n_train=2, n_test=1)
    _make_folder_tree(tmp_path / "long", spec)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        archive = tmp_path / f"long{fmt}.tar.gz"
        with tarfile.open(archive, "w:gz", format=fmt) as tf:
            tf.add(tmp_path / "long", arcname="long")
        train, _ = imagefolder.read_imagefolder(archive)
        assert train.classes == ["x" * 120, "y"]
        assert torch.equal(train.images, torch.from_numpy(_expected(spec, "train")[0]))


def test_imagefolder_greyscale_and_sizes(tmp_path):
    rng = np.random.default_rng(6)
    grey = {
        s: {"a": list(_images(rng, 2, c=1)), "b": list(_images(rng, 2, c=1))}
        for s in ("train", "test")
    }
    _make_folder_tree(tmp_path / "grey", grey)
    train, _ = imagefolder.read_imagefolder(tmp_path / "grey")
    assert train.images.shape == (4, 1, 8, 8)
    assert torch.equal(train.images, torch.from_numpy(_expected(grey, "train")[0]))

    mixed = {
        s: {"a": list(_images(rng, 2, c=1)), "b": list(_images(rng, 2))} for s in ("train", "test")
    }
    _make_folder_tree(tmp_path / "mixed", mixed)
    train, _ = imagefolder.read_imagefolder(tmp_path / "mixed")
    assert train.images.shape == (4, 3, 8, 8)
    g = torch.from_numpy(mixed["train"]["a"][0])
    assert all(torch.equal(train.images[0, ch], g) for ch in range(3))  # grey replicated

    sizes = {
        "train": {"a": [_images(rng, 1, 12, 20)[0], _images(rng, 1, 30, 10)[0]]},
        "test": {"a": [_images(rng, 1, 16, 16)[0]]},
    }
    _make_folder_tree(tmp_path / "var", sizes)
    train, test = imagefolder.read_imagefolder(tmp_path / "var")
    assert train.image_size == test.image_size == (10, 10)  # smallest shorter side
    train, test = imagefolder.read_imagefolder(tmp_path / "var", image_size=6)
    assert train.image_size == test.image_size == (6, 6)
    # a constant image stays constant through resize + centre crop
    const = {
        "train": {"a": [np.full((9, 15, 3), 77, np.uint8)]},
        "test": {"a": [np.full((20, 20, 3), 77, np.uint8)]},
    }
    _make_folder_tree(tmp_path / "const", const)
    train, test = imagefolder.read_imagefolder(tmp_path / "const")
    assert train.image_size == (9, 9) and bool((train.images == 77).all())
    assert bool((test.images == 77).all())


def test_imagefolder_errors(tmp_path):
    rng = np.random.default_rng(7)
    ok = _png(_images(rng, 1)[0])

    def tar(name, members):
        return _tar_with(tmp_path / f"{name}.tar.gz", members)

    corrupt = tar(
        "corrupt",
        [("d/train/a/1.png", ok), ("d/train/a/2.png", b"\x89PNG broken"), ("d/test/a/1.png", ok)],
    )
    with pytest.raises(DataError, match=r"d/train/a/2\.png.*cannot decode"):
        imagefolder.read_imagefolder(corrupt)

    empty = tar(
        "empty",
        [
            ("d/train/a/1.png", ok),
            ("d/train/zz_empty", None),
            ("d/test/a/1.png", ok),
            ("d/test/zz_empty", None),
        ],
    )
    with pytest.raises(DataError, match="zz_empty.*empty class folder"):
        imagefolder.read_imagefolder(empty)

    differ = tar(
        "differ",
        [("d/train/a/1.png", ok), ("d/train/only_train/1.png", ok), ("d/test/a/1.png", ok)],
    )
    with pytest.raises(DataError, match="class sets differ.*only_train"):
        imagefolder.read_imagefolder(differ)

    missing = tar("missing", [("d/train/a/1.png", ok)])
    with pytest.raises(DataError, match="missing split 'test'"):
        imagefolder.read_imagefolder(missing)

    two_tops = tar("twotops", [("d/train/a/1.png", ok), ("e/test/a/1.png", ok)])
    with pytest.raises(DataError, match="single top folder"):
        imagefolder.read_imagefolder(two_tops)

    noimg = tar("noimg", [("d/train/a/readme.txt", b"hi"), ("d/test/a/readme.txt", b"hi")])
    with pytest.raises(DataError, match="no images"):
        imagefolder.read_imagefolder(noimg)

    loose = tar("loose", [("d/train/1.png", ok), ("d/test/a/1.png", ok)])
    with pytest.raises(DataError, match="not inside a class folder"):
        imagefolder.read_imagefolder(loose)

    # directory variant: an empty class folder
    _make_folder_tree(tmp_path / "dir", _spec(rng, classes=("a",), n_train=1, n_test=1))
    (tmp_path / "dir" / "test" / "b").mkdir()
    (tmp_path / "dir" / "train" / "b").mkdir()
    (tmp_path / "dir" / "train" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"train/b: empty class folder"):
        imagefolder.read_imagefolder(tmp_path / "dir")

    with pytest.raises(DataError, match="label 5 is out of range"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["x", "y"])


def test_load_dataset_not_found_message(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("gtsrb")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert "cifar10.tar.gz" in msg and "cifar-10-python.tar.gz" in msg and "--download" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("gtsrb", tmp_path / "nope")


# --------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch, _cache_dir):
    rng = np.random.default_rng(8)
    src = tmp_path / "src"
    _make_folder_tree(src / "toy", _spec(rng))
    root = tmp_path / "root"
    root.mkdir()
    archive = _tar_folder(src / "toy", root / "toy.tar.gz", "toy")

    real_read = imagefolder.read_imagefolder
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "read_imagefolder", counting)
    first = load_dataset("toy", root)
    assert len(calls) == 1
    assert len(list(_cache_dir.glob("*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite a cache entry")

    decode_chunk = imagefolder._decode_chunk
    monkeypatch.setattr(imagefolder, "_decode_chunk", boom)
    second = load_dataset("toy", root)
    assert len(calls) == 1
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.classes == second.classes and first.mean == second.mean
    monkeypatch.setattr(imagefolder, "_decode_chunk", decode_chunk)

    # other options are a different entry
    load_dataset("toy", root, image_size=4)
    assert len(calls) == 2

    # a changed source invalidates the entry
    new_spec = _spec(np.random.default_rng(9))
    _make_folder_tree(src / "toy2", new_spec)
    _tar_folder(src / "toy2", archive, "toy")
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = load_dataset("toy", root)
    assert len(calls) == 3
    assert torch.equal(third.train.images, torch.from_numpy(_expected(new_spec, "train")[0]))

    # a corrupt cache file is ignored and rebuilt
    for f in _cache_dir.glob("*.safetensors"):
        f.write_bytes(b"\x00" * 100)
    fourth = load_dataset("toy", root)
    assert len(calls) == 4
    assert torch.equal(fourth.train.images, third.train.images)
    load_dataset("toy", root)
    assert len(calls) == 4  # rebuilt entry is used again

    # cache=False neither reads nor writes
    load_dataset("toy", root, cache=False)
    assert len(calls) == 5


def test_cache_directory_fingerprint(tmp_path):
    d = tmp_path / "d"
    (d / "x").mkdir(parents=True)
    (d / "x" / "a.png").write_bytes(b"1")
    k1 = cache_mod.cache_key({"r": 1}, [d])
    assert k1 == cache_mod.cache_key({"r": 1}, [d])
    assert k1 != cache_mod.cache_key({"r": 2}, [d])
    (d / "x" / "b.png").write_bytes(b"2")
    assert cache_mod.cache_key({"r": 1}, [d]) != k1


# --------------------------------------------------------------------------- stats, registry


def test_stats_and_registry(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8, generator=g)
    mean, std = registry.channel_stats(imgs)
    x = imgs.double() / 255
    assert np.allclose(mean, x.mean((0, 2, 3)).numpy())
    assert np.allclose(std, x.std((0, 2, 3), unbiased=False).numpy())

    assert registry.default_augment("gtsrb", (32, 32)) == {"kind": "crop", "pad": 4, "flip": False}
    assert registry.default_augment("flower17", (128, 128)) == {
        "kind": "resized_crop",
        "scale": [0.35, 1.0],
        "flip": True,
    }
    names = {d["name"] for d in list_datasets()}
    assert {"digits", "cifar10", "cifar100", "gtsrb", "flower17", "tinyimagenet200"} <= names

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"xyz")
    good = hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "SHA256SUMS").write_text(
        f"{good}  a.bin\n{good} *b.bin\n{good}  c.bin\nnot a line\n"
    )
    res = {f: (ok, detail) for f, ok, detail in registry.verify_data_root(tmp_path)}
    assert res["a.bin"] == (True, "ok")
    assert res["b.bin"][0] is False and "mismatch" in res["b.bin"][1]
    assert res["c.bin"] == (False, "missing")
    assert any(f.startswith("SHA256SUMS:") and not ok for f, (ok, _) in res.items())
    (tmp_path / "empty").mkdir()
    assert registry.verify_data_root(tmp_path / "empty") == []


def test_digits():
    s = load_dataset("digits")
    assert s.train.channels == 1 and s.train.image_size == (16, 16)
    assert s.num_classes == 10 and s.classes == [str(i) for i in range(10)]
    assert len(s.train) + len(s.test) == 1797
    counts_test = torch.bincount(s.test.labels, minlength=10)
    counts_all = counts_test + torch.bincount(s.train.labels, minlength=10)
    assert torch.all((counts_test - 0.2 * counts_all).abs() <= 0.5)
    assert s.augment == {"kind": "crop", "pad": 2, "flip": False}
    assert len(s.mean) == 1 and 0 < s.mean[0] < 1
    again = load_dataset("digits")
    assert torch.equal(again.test.images, s.test.images)
    assert int(s.train.images.max()) == 255


# --------------------------------------------------------------------------- subsets


def _labelled(counts: list[int]) -> ImageDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return ImageDataset(images.contiguous(), labels, [str(c) for c in range(len(counts))])


def test_per_class_subset():
    ds = _labelled([10, 7, 1, 0])
    sub = per_class_subset(ds, fraction=0.5, seed=3)
    assert torch.bincount(sub.labels, minlength=4).tolist() == [5, 4, 1, 0]
    torch.manual_seed(123)
    sub2 = per_class_subset(ds, fraction=0.5, seed=3)
    torch.manual_seed(456)
    sub3 = per_class_subset(ds, fraction=0.5, seed=3)
    assert torch.equal(sub2.images, sub.images) and torch.equal(sub3.images, sub.images)
    other = per_class_subset(ds, fraction=0.5, seed=4)
    assert not torch.equal(other.images, sub.images)
    capped = per_class_subset(ds, per_class=3)
    assert torch.bincount(capped.labels, minlength=4).tolist() == [3, 3, 1, 0]
    with pytest.raises(ConfigError):
        per_class_subset(ds)
    with pytest.raises(ConfigError):
        per_class_subset(ds, fraction=1.5)

    train, val = split_validation(ds, 0.3, seed=1)
    assert len(train) + len(val) == len(ds)
    ids = set(train.images[:, 0, 0, 0].tolist()) | set(val.images[:, 0, 0, 0].tolist())
    assert len(ids) == len(ds)
    assert torch.bincount(val.labels, minlength=4).tolist() == [3, 2, 0, 0]
    train2, val2 = split_validation(ds, 0.3, seed=1)
    assert torch.equal(val2.images, val.images)


# --------------------------------------------------------------------------- loader


def _toy(n: int = 10, h: int = 8, w: int = 8, c: int = 3) -> ImageDataset:
    base = torch.arange(h * w).view(1, 1, h, w) + 1  # 1..64: position-coded, nonzero
    images = base + torch.arange(n).view(n, 1, 1, 1) * 3 + torch.arange(c).view(1, c, 1, 1)
    return ImageDataset(images.to(torch.uint8), torch.arange(n) % 3, ["a", "b", "c"])


def test_loader_order_and_epochs():
    ds = _toy(23)
    loader = DeviceLoader(ds, 5, shuffle=True, seed=7)
    assert len(loader) == 5
    epochs = []
    for _ in range(3):
        idx = torch.cat([i for _, _, i in loader])
        assert sorted(idx.tolist()) == list(range(23))
        epochs.append(idx)
    assert not torch.equal(epochs[0], epochs[1])
    again = DeviceLoader(ds, 5, shuffle=True, seed=7)
    assert torch.equal(torch.cat([i for _, _, i in again]), epochs[0])
    again.set_epoch(2)
    assert torch.equal(torch.cat([i for _, _, i in again]), epochs[2])
    assert not torch.equal(
        torch.cat([i for _, _, i in DeviceLoader(ds, 5, shuffle=True, seed=8)]), epochs[0]
    )
    for x, y, i in DeviceLoader(ds, 5):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, ds.labels[i])
    seq = torch.cat([i for _, _, i in DeviceLoader(ds, 5)])
    assert seq.tolist() == list(range(23))
    dropped = DeviceLoader(ds, 5, drop_last=True, shuffle=True)
    assert len(dropped) == 4 and sum(len(i) for _, _, i in dropped) == 20


def test_loader_normalisation_and_channels_last():
    ds = _toy(4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    x, _, idx = next(iter(DeviceLoader(ds, 4, mean=mean, std=std, channels_last=True)))
    expect = (ds.images[idx].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-6)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(normalize(ds.images[0].float() / 255, mean, std), expect[0], atol=1e-6)


def _match_shift(out: torch.Tensor, inp: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) that makes ``out`` a zero-filled shifted copy of ``inp``."""
    c, h, w = inp.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=inp.dtype)
    padded[:, pad : pad + h, pad : pad + w] = inp
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if torch.equal(out, crop.flip(-1) if flipped else crop):
                    return dy, dx, flipped
    return None


def test_loader_crop_is_shifted_copy():
    ds = _toy(64)
    loader = DeviceLoader(ds, 16, augment={"kind": "crop", "pad": 2, "flip": True}, seed=1)
    seen = set()
    for x, _, idx in loader:
        assert x.shape == (len(idx), 3, 8, 8)
        pix = (x * 255).round().to(torch.uint8)
        for k in range(len(idx)):
            m = _match_shift(pix[k], ds.images[idx[k]], 2)
            assert m is not None
            seen.add(m)
    assert len({m[:2] for m in seen}) > 5 and {m[2] for m in seen} == {False, True}

    # flip only (pad 0): each output is the input or its mirror, both occur
    flips = set()
    for x, _, idx in DeviceLoader(ds, 64, augment={"kind": "crop", "pad": 0, "flip": True}):
        pix = (x * 255).round().to(torch.uint8)
        for k in range(len(idx)):
            m = _match_shift(pix[k], ds.images[idx[k]], 0)
            assert m is not None
            flips.add(m[2])
    assert flips == {False, True}
    # no flip requested: never mirrored
    for x, _, idx in DeviceLoader(ds, 64, augment={"kind": "crop", "pad": 1, "flip": False}):
        pix = (x * 255).round().to(torch.uint8)
        assert all(_match_shift(pix[k], ds.images[idx[k]], 1)[2] is False for k in range(64))

    a = [x for x, _, _ in DeviceLoader(ds, 16, augment={"kind": "crop", "pad": 2}, seed=5)]
    b = [x for x, _, _ in DeviceLoader(ds, 16, augment={"kind": "crop", "pad": 2}, seed=5)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_loader_resized_crop():
    ds = _toy(12, 16, 16)
    aug = {"kind": "resized_crop", "scale": [0.35, 1.0], "flip": True}
    xs = [x for x, _, _ in DeviceLoader(ds, 6, augment=aug, seed=2)]
    assert all(x.shape == (6, 3, 16, 16) for x in xs)
    assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for x in xs)
    ys = [x for x, _, _ in DeviceLoader(ds, 6, augment=aug, seed=2)]
    assert all(torch.equal(p, q) for p, q in zip(xs, ys, strict=True))
    plain = torch.cat([x for x, _, _ in DeviceLoader(ds, 6)])
    assert not torch.allclose(torch.cat(xs), plain)

    const = ImageDataset(torch.full((5, 3, 16, 16), 100, dtype=torch.uint8), torch.zeros(5), ["a"])
    for x, _, _ in DeviceLoader(const, 5, augment=aug):
        assert torch.allclose(x, torch.full_like(x, 100 / 255), atol=1e-5)
    with pytest.raises(ConfigError):
        DeviceLoader(ds, 4, augment={"kind": "mixup"})


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_shared_flower17():
    archive = SHARED_DATA / "flower17.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    s = load_dataset("flower17", SHARED_DATA)
    assert s.num_classes == 17 and s.classes[0] == "00_daffodil"
    assert len(s.train) == 1190 and len(s.test) == 170
    assert s.train.channels == 3 and s.train.image_size == (128, 128)
    assert torch.bincount(s.train.labels).tolist() == [70] * 17
    assert s.augment["kind"] == "resized_crop"


def test_cifar100_official_format_bytes_keys(tmp_path):
    """CIFAR-100 as the official archive stores it: Python-2 pickles (protocol 2) whose dict
    keys and label names are bytes once loaded in Python 3."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "src" / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        blob = {
            b"filenames": [b"img_%d.png" % k for k in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": x,
        }
        (folder / split).write_bytes(pickle.dumps(blob, protocol=2))
        expected[split] = (x.reshape(-1, 3, 32, 32), fine)
    meta = {
        b"fine_label_names": [f"fine_{k:02d}".encode() for k in range(100)],
        b"coarse_label_names": [f"coarse_{k:02d}".encode() for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    root = tmp_path / "root"
    root.mkdir()
    _tar_folder(folder, root / "cifar-100-python.tar.gz", "cifar-100-python")

    splits = load_dataset("cifar100", root, cache=False)
    assert splits.num_classes == 100
    assert splits.classes[:2] == ["fine_00", "fine_01"] and splits.classes[-1] == "fine_99"
    for split, ds in (("train", splits.train), ("test", splits.test)):
        assert torch.equal(ds.images, torch.from_numpy(expected[split][0]))
        assert ds.labels.tolist() == expected[split][1]
    assert splits.augment == {"kind": "crop", "pad": 4, "flip": True}
    # the extracted folder reads the same
    train, test = cifar.read_cifar("cifar100", tmp_path / "src")
    assert torch.equal(train.images, splits.train.images)
    assert test.labels.tolist() == expected["test"][1]


def test_shapes_is_generated_balanced_and_the_same_every_time():
    s = load_dataset("shapes")
    assert s.train.channels == 3 and s.train.image_size == (32, 32)
    assert s.classes == list(synthetic.SHAPES_CLASSES) and s.source.startswith("generated:")
    assert (len(s.train), len(s.test)) == (synthetic.SHAPES_TRAIN, synthetic.SHAPES_TEST)
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [1000] * 10
    assert s.augment == {"kind": "crop", "pad": 4, "flip": True}
    again = load_dataset("shapes")
    assert torch.equal(again.train.images[:64], s.train.images[:64])
    assert not torch.equal(s.train.images[:64], s.test.images[:64])
    assert load_dataset("shapes", image_size=16).train.image_size == (16, 16)
    with pytest.raises(DataError, match="at least 8"):
        synthetic.load_shapes(4)


def test_shapes_classes_differ_where_a_model_can_see_it():
    """Every class's mask at the same place and size differs from every other's, and the
    ring and frame are hollow where the disk and square are filled."""
    n = len(synthetic.SHAPES_CLASSES)
    px = (torch.arange(32, dtype=torch.float32) + 0.5 - 16) / 8
    dx, dy = px.view(1, 1, 32).expand(n, 32, 32), px.view(1, 32, 1).expand(n, 32, 32)
    masks = synthetic._masks(torch.arange(n), dx, dy)
    for a in range(n):
        for b in range(a + 1, n):
            assert (masks[a] ^ masks[b]).sum() >= 20, (a, b)
    names = list(synthetic.SHAPES_CLASSES)
    centre = masks[:, 16, 16]
    assert centre[names.index("disk")] and centre[names.index("square")]
    assert not centre[names.index("ring")] and not centre[names.index("frame")]


def test_fractals_is_generated_balanced_and_the_same_every_time():
    f = load_dataset("fractals", image_size=16)
    assert f.train.channels == 3 and f.train.image_size == (16, 16)
    assert f.classes == list(fractals.FRACTALS_CLASSES) and f.source.startswith("generated:")
    assert (len(f.train), len(f.test)) == (fractals.FRACTALS_TRAIN, fractals.FRACTALS_TEST)
    assert torch.bincount(f.train.labels, minlength=10).tolist() == [1000] * 10
    again = load_dataset("fractals", image_size=16)
    assert torch.equal(again.train.images, f.train.images)
    again.train.images.zero_()  # a caller's change does not reach the next load
    assert torch.equal(load_dataset("fractals", image_size=16).train.images, f.train.images)
    assert not torch.equal(f.train.images[:64], f.test.images[:64])
    with pytest.raises(DataError, match="at least 8"):
        fractals.load_fractals(4)


def test_fractal_systems_are_contractive_and_their_chaos_game_stays_bounded():
    systems = fractals.class_systems()
    assert len(systems) == len(fractals.FRACTALS_CLASSES)
    for a, t, p in systems:
        assert 2 <= len(a) < 5 and abs(p.sum() - 1) < 1e-9
        assert np.linalg.svd(a, compute_uv=False).max() < fractals.MAX_GAIN
        pts = fractals.chaos_game(np.random.default_rng(0), a, t, p, 4)
        # a contraction of gain g < 1 with shifts |s| <= ~1.2 keeps points within 1.2 / (1 - g)
        assert np.isfinite(pts).all() and np.abs(pts).max() < 1.3 / (1 - fractals.MAX_GAIN)
    # the classes are different systems, not one system drawn ten times
    assert len({a.tobytes() for a, _, _ in systems}) == len(systems)
