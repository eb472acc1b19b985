"""Teacher transforms: one registry for what turns a suspect teacher into what distillation
uses (a defence's cleaned copy, RobustKD's detoxification), and the distill command runs
whatever it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from robustkd import api
from robustkd.defenses import (
    TEACHER_DEFENSES,
    TRANSFORMS,
    TransformContext,
    Transformed,
    chosen_transform,
    get_transform,
    teacher_transforms,
    threshold,
)
from robustkd.defenses import robustkd as rkd
from robustkd.errors import ConfigError


def test_every_defence_and_robustkd_are_transforms():
    transforms = teacher_transforms()
    for name in TEACHER_DEFENSES:
        assert transforms[name].chosen_by == "defense"
        assert transforms[name].distils_with is None  # a cleaned copy: any method reads it
    assert transforms["robustkd"].chosen_by == "method"
    assert transforms["robustkd"].distils_with == "fkd"


def test_an_unknown_name_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"unknown teacher transform 'prune'; available: "
                                          r"\['anp', 'crossfit', 'finetune', 'fst', 'ibau', 'nad', "
                                          r"'robustkd'\]"):
        get_transform("prune")
    with pytest.raises(ConfigError, match=r"unknown teacher defence 'prune'; available: "
                                          r"\['anp', 'crossfit', 'finetune', 'fst', 'ibau', "
                                          r"'nad'\]"):
        chosen_transform("defense", {"defense": "prune"})


def test_a_method_that_is_no_transform_is_plain_distillation():
    assert chosen_transform("method", {"method": "fkd"}) is None
    assert chosen_transform("method", {"method": "robustkd"}) is get_transform("robustkd")
    assert chosen_transform("defense", {"defense": None}) is None


def test_settings_of_a_transform_not_chosen_are_refused():
    with pytest.raises(ConfigError, match="defence settings need a defence"):
        chosen_transform("defense", {"defense": None, "defense_options": {"epochs": 1}})
    with pytest.raises(ConfigError, match="only apply to --method robustkd, not kd"):
        chosen_transform("method", {"method": "kd", "robustkd": {"tau": 0.3}})


def test_threshold_selection_keeps_its_old_import_path():
    assert rkd.select_blind is threshold.select_blind
    assert rkd.select_oracle is threshold.select_oracle


@dataclass(frozen=True)
class _Probe:
    """A transform that records what it was given and adds a record field."""

    name: str
    chosen_by: str
    distils_with: str | None = None
    calls: list = None  # type: ignore[assignment]
    options_key: ClassVar[str] = "defense_options"

    def check(self, options: Any) -> Any:
        return options

    def unchosen(self, settings: Any) -> str:
        return f"{self.name} settings without {self.name}"

    def __call__(self, ctx: TransformContext) -> Transformed:
        self.calls.append(ctx)
        return Transformed(ctx.teacher, {"probe": {"name": self.name, "clean": len(ctx.clean)}},
                           f"probe {self.name} ran")


@pytest.fixture(scope="module")
def teacher_run(digits_teacher_run):
    return digits_teacher_run


def _distill(teacher_run, out, **kw):
    return api.distill(teacher=teacher_run, student="wrn10_1", epochs=1, clean_fraction=0.1,
                       device="cpu", progress=False, out=out, **kw)


def test_a_registered_cleaning_transform_runs_and_its_fields_land_in_the_record(
        teacher_run, tmp_path, monkeypatch, capsys):
    probe = _Probe("probe", "defense", calls=[])
    monkeypatch.setitem(TRANSFORMS, "probe", probe)
    record = _distill(teacher_run, tmp_path / "s", method="ce", defense="probe",
                      defense_options={"k": 1})
    (ctx,) = probe.calls
    assert ctx.settings["defense"] == "probe" and ctx.settings["defense_options"] == {"k": 1}
    assert ctx.run_dir == tmp_path / "s" and ctx.run.epochs == 1
    assert record["probe"] == {"name": "probe", "clean": record["clean_images"]}
    assert len(record["history"]) == 1 and "distill_seconds" in record  # then plain ce
    printed = capsys.readouterr()
    assert "probe probe ran" in printed.out + printed.err


def test_a_distilling_transform_replaces_plain_distillation(teacher_run, tmp_path,
                                                             monkeypatch):
    probe = _Probe("probe-distil", "method", distils_with="ce", calls=[])
    monkeypatch.setitem(TRANSFORMS, "probe-distil", probe)
    record = _distill(teacher_run, tmp_path / "s", method="probe-distil")
    assert len(probe.calls) == 1 and record["probe"]["name"] == "probe-distil"
    assert record["history"] == [] and "distill_seconds" not in record
    assert record["config"]["method"] == "probe-distil"
