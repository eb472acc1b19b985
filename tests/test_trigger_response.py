"""benchmarks/trigger_response.py: the ASR-vs-strength curve and its t50."""

import json

import pytest
import torch
from torch import nn

from tests.bench_scripts import load_script

tr = load_script("trigger_response")


class Threshold(nn.Module):
    """Class 1 when the mean pixel exceeds ``level``, else class 0."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([self.level - m, m - self.level], 1)


def test_response_steps_where_the_model_starts_to_fire():
    images, triggered = torch.zeros(10, 1, 4, 4), torch.ones(10, 1, 4, 4)
    zero, one = (0.0,), (1.0,)
    curve = tr.response(Threshold(0.35), images, triggered, 1, zero, one, batch=3)
    assert curve == [0.0] * 4 + [1.0] * 7  # fires from t = 0.4 on
    assert tr.t50(curve) == pytest.approx(0.35)


def test_t50_reads_between_points_and_says_none_when_never_reached():
    assert tr.t50([0.0] * 10 + [0.4]) is None
    assert tr.t50([0.6] + [1.0] * 10) == 0.0
    curve = [0.0] * 5 + [0.2, 0.8] + [1.0] * 4  # 0.2 at t 0.5, 0.8 at t 0.6
    assert tr.t50(curve) == pytest.approx(0.55)


def test_main_on_a_backdoored_run(tmp_path, monkeypatch, capsys):
    from robustkd import api

    api.attack(attack="blended", model="wrn10_1", dataset="digits", epochs=1, lr=0.05,
               options={"alpha": 0.3}, out=tmp_path / "t", device="cpu", progress=False)
    monkeypatch.setattr("sys.argv", ["trigger_response", "--teacher", str(tmp_path / "t"),
                                     "--model", str(tmp_path / "t"), "--images", "40"])
    capsys.readouterr()  # the attack's own output
    tr.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in lines] == ["teacher", "model"]
    assert lines[0]["asr"] == lines[1]["asr"] and len(lines[0]["asr"]) == len(tr.STRENGTHS)
    assert lines[0]["images"] == 40
