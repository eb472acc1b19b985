"""Checkpoints: atomic writes, safetensors round trip, pickle refused and never executed."""

import json
import os
import pickle

import pytest
import torch

from robustkd.errors import UnsafeCheckpointError
from robustkd.io import (
    atomic_write,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
    save_tensors,
    write_json,
)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_file(tmp_path, suffix=".pt"):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Evil(marker)}, fh)
    return path, marker


def test_pickle_checkpoint_is_refused_without_opt_in(tmp_path):
    path, marker = _evil_file(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        load_state_dict(path)
    assert not marker.exists()


def test_pickle_with_opt_in_uses_weights_only_and_does_not_execute(tmp_path):
    path, marker = _evil_file(tmp_path, ".pth")
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(path, allow_pickle=True)
    assert not marker.exists()


def test_pickle_disguised_as_other_suffix_is_refused(tmp_path):
    path, marker = _evil_file(tmp_path, ".weights")
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists()


def test_benign_pickle_state_dict_loads_with_opt_in(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": state}, tmp_path / "ok.pt")
    loaded = load_state_dict(tmp_path / "ok.pt", allow_pickle=True)
    assert torch.equal(loaded["w"], state["w"])


def test_safetensors_round_trip_with_extra_tensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, model, {"arch": "linear"}, {"trigger.mask": torch.ones(1, 2, 2)})
    state, meta, extra = load_checkpoint(tmp_path)
    assert meta == {"arch": "linear"}
    assert torch.equal(state["weight"], model.weight.detach())
    assert torch.equal(extra["trigger.mask"], torch.ones(1, 2, 2))
    assert set(load_state_dict(tmp_path / "model.safetensors")) >= {"weight", "bias"}


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "record.json"
    write_json(target, {"acc": 0.5})

    def broken(path):
        path.write_text('{"acc": ')  # half-written
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


def test_write_json_with_unserialisable_value_leaves_previous_file(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}


def test_save_tensors_failure_keeps_previous_weights(tmp_path):
    target = tmp_path / "w.safetensors"
    save_tensors(target, {"a": torch.ones(2)})
    with pytest.raises(Exception):  # noqa: B017 - any failure must leave the old file
        save_tensors(target, {"a": "not a tensor"})
    assert torch.equal(load_state_dict(target)["a"], torch.ones(2))


def test_missing_run_dir_message_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a robustkd run directory"):
        load_checkpoint(tmp_path)


def test_no_tensors_save_and_load_back(tmp_path):
    # safetensors writes an unreadable header for no tensors with empty metadata
    path = save_tensors(tmp_path / "empty.safetensors", {}, metadata={})
    assert load_state_dict(path) == {}
