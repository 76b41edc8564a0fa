"""minielectra/allocator.py: freed memory is kept for the next arrays, which then take no page faults."""

import os
import platform
import subprocess
import sys

import pytest

from minielectra import allocator

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Twenty 200 KB arrays at a time, four times over; prints the page faults of each round. glibc serves them from its
# heap once the first round has raised its mmap threshold, and by default trims the heap's free top back to the
# system after each round, so every round faults its 4 MB in again (about 1,000 pages).
PROBE = """
import resource, sys
import numpy as np
from minielectra import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def round_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(200_000, np.uint8) for _ in range(20)]
    del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[round_faults() for _ in range(4)])
"""


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert min(default[1:]) > 500  # the probe shows the cost it is about
    assert max(kept[1:]) < 50  # the first round faults its pages in once; the others reuse them


def test_the_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
