"""``distill --clean-val``: settings are compared on a share of the defender's own clean
images, and the test set is not what the record measures."""

import pytest

from robustkd import api
from robustkd.data import load_dataset
from robustkd.data.subsets import per_class_subset, split_validation
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.runs import load_run


@pytest.fixture(scope="module")
def teacher_run(digits_teacher_run):
    return digits_teacher_run


def test_the_record_measures_the_held_out_share_of_the_clean_images(teacher_run, tmp_path):
    rec = api.distill(teacher=teacher_run, student="wrn10_1", epochs=1, clean_fraction=0.5,
                      clean_seed=3, clean_val=0.2, device="cpu", progress=False,
                      out=tmp_path / "s")
    digits = load_dataset("digits")
    clean = per_class_subset(digits.train, fraction=0.5, seed=3)
    train, val = split_validation(clean, 0.2, seed=3)
    assert rec["clean_images"] == len(train) < len(clean)
    assert rec["config"]["clean_val"] == 0.2
    student = load_run(tmp_path / "s")
    on_val = evaluate_model(student.model, val, student.mean, student.std)
    on_test = evaluate_model(student.model, digits.test, student.mean, student.std)
    assert rec["metrics"]["acc"] == pytest.approx(on_val["acc"])
    assert on_val["acc"] != pytest.approx(on_test["acc"])


def test_a_share_outside_its_range_names_the_flag(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="clean.val"):
        api.distill(teacher=teacher_run, clean_val=0.7, epochs=1, device="cpu",
                    out=tmp_path / "s")
