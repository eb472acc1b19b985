"""The API package stays small: short modules with one job each, short functions with few
parameters (an entry point takes its job; its keywords come from the job's fields)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "src" / "robustkd" / "api"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 150, 100, 12
MODULES = sorted(API.glob("*.py"))


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    return (len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None)
            + (a.kwarg is not None))


def test_the_api_is_a_package_of_modules():
    names = {p.stem for p in MODULES}
    assert {"__init__", "train", "attack", "evaluate", "distill", "imports", "scan",
            "context"} <= names
    assert not (API.parent / "api.py").exists()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name} is over {MAX_MODULE_LINES}"
    for fn in _functions(ast.parse(text)):
        lines = fn.end_lineno - fn.lineno + 1
        assert lines <= MAX_FUNCTION_LINES, f"{path.name}:{fn.name} has {lines} lines"
        assert _parameters(fn) <= MAX_PARAMETERS, f"{path.name}:{fn.name} has too many parameters"


def test_the_size_check_sees_functions_and_parameters():
    (fn,) = _functions(ast.parse("def f(a, /, b, *c, d, **e):\n    pass\n"))
    assert _parameters(fn) == 5 and fn.end_lineno == 2
