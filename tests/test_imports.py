"""Every package entry point imports on its own (catches import cycles that depend on order)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", [
    "robustkd.evaluation.metrics", "robustkd.attacks", "robustkd.distill",
    "robustkd.defenses.robustkd", "robustkd.data", "robustkd.cli",
])
def test_module_imports_first(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
