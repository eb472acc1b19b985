"""keep_freed_memory: freed blocks stay in the process, so re-allocating them faults no pages."""

import subprocess
import sys

import pytest

from robustkd.training import host_memory

# a step whose activations (4 x 12 MB) are alive together, then freed: by default glibc trims
# the heap's free top (above twice its dynamic mmap threshold) and the next step faults every
# page in again; kept, the steps after the first reuse the same pages
STEPS = """
import resource, sys, torch
from robustkd.training.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    blocks = [torch.ones(3 * 2**20) for _ in range(4)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 5 * 4 * 12 * 2**20 // 4096  # what five steps fault when nothing is reused


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    kept, kept_faults = faults("keep")
    if kept != "True":
        pytest.skip("not glibc")
    assert kept_faults < PAGES // 8, f"{kept_faults} page faults in five steps; by " \
        f"default {faults('default')[1]}"


def test_the_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_kept", False)
    monkeypatch.setenv(host_memory.OPT_OUT, "0")
    assert host_memory.keep_freed_memory() is False
