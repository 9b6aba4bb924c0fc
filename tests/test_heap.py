"""The C heap kept for reuse (vlstack.heap), checked in a child process: it is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from vlstack.heap import keep_freed_memory
print(keep_freed_memory())
x = torch.randn(8 << 20 >> 2)  # 8 MB, far over glibc's default mmap threshold
def step():  # several big temporaries alive at once, as in an MLP
    a = x * 2; b = a + x; return float((a * b).sum())
for _ in range(3): step()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[5])  # the median step's: a one-off new block (seen: 8 MB once in 10 steps) is not a step's
"""


def probe(**env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_big_blocks_are_reused_without_page_faults():
    kept, faults = probe()
    assert kept == "True"
    # each step allocates three 8 MB blocks (6,000 pages); reused from the heap, they fault no page in
    assert faults < 200, faults


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_an_operators_malloc_settings_are_left_alone():
    kept, faults = probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "False"
    assert faults > 4000, faults  # their setting (every big block from fresh pages) is what runs
