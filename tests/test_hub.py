"""A teacher named by a model-hub id, resolved offline from a locally built hub cache."""

from __future__ import annotations

import shutil

import pytest

from robustkd import api
from robustkd.errors import ConfigError, UnsafeCheckpointError
from robustkd.hub import fetch, parse_hub_ref

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id, files):
    """The layout huggingface_hub keeps: refs/main -> commit, snapshots/<commit>/<file>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return root


def test_parse_and_refuse_pickle_before_fetching():
    assert parse_hub_ref("hf://org/net/sub/model.safetensors@v1") == (
        "org/net", "sub/model.safetensors", "v1")
    with pytest.raises(ConfigError, match="is not a hub file"):
        parse_hub_ref("hf://org/model.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="only .safetensors"):
        fetch("hf://org/net/model.pt")


def test_import_a_teacher_from_the_hub_cache_offline(tmp_path, monkeypatch):
    api.train(dataset="digits", model="wrn10_1", epochs=1, out=tmp_path / "t", device="cpu",
              progress=False, eval_every=0)
    cache = hub_cache(tmp_path / "hub", "org/tiny",
                      {"model.safetensors": tmp_path / "t" / "model.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = api.import_weights(model="wrn10_1", weights="hf://org/tiny/model.safetensors",
                             dataset="digits", device="cpu", out=tmp_path / "imported")
    teacher = api.evaluate(run=tmp_path / "t", device="cpu")
    assert rec["metrics"]["acc"] == pytest.approx(teacher["metrics"]["acc"])
    with pytest.raises(ConfigError, match="not in the hub cache .HF_HUB_OFFLINE is set"):
        api.import_weights(model="wrn10_1", weights="hf://org/other/model.safetensors",
                           dataset="digits", device="cpu", out=tmp_path / "missing")
