"""minielectra/allocator.py: freed memory is kept for the next arrays, which then take no page faults."""

import os
import platform
import subprocess
import sys

import pytest

from minielectra import allocator

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh process: glibc's defaults, or the settings (which cannot be undone) applied first.
PROBE = ("import sys; from minielectra import allocator; keep = sys.argv[1] == 'keep'; "
         "assert not keep or allocator.keep_freed_memory(); print(*allocator.faults_per_round())")


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    if max(default[1:]) < 500:  # e.g. transparent huge pages for all memory: 2 MB faults, a handful per round
        pytest.skip(f"this system does not fault a returned heap back in 4 KB at a time (default rounds: {default})")
    assert min(default[1:]) > 500  # every round faults its 4 MB (about 1,000 pages) in again: the cost at stake
    assert max(kept[1:]) < 50  # the first round faults its pages in once; the others reuse them


def test_the_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
