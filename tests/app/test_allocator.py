"""Large temporaries freed in worker threads go back to the system (proxy/allocator.py).

The pattern of the OPE bootstrap in a thread pool: ~10 MB index and value arrays in six
threads, with small objects kept alive in between. With glibc's dynamic mmap threshold the
threads' arenas kept 155-186 MB of it resident here; with the threshold fixed, 8 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = r"""
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
if sys.argv[1] == "fixed":
    from proxy.allocator import return_large_blocks
    assert return_large_blocks()
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
kept = []
def bootstrap_like(i):
    rng = np.random.default_rng(i)
    n = 4000 + (i % 7) * 150
    idx = rng.integers(0, n, size=(266, n))
    values = np.ones(n)[idx] * 2.0
    kept.append(bytearray(2000))
    return float(values.sum())
start = rss_mb()
with ThreadPoolExecutor(6) as pool:
    for r in range(40):
        list(pool.map(bootstrap_like, range(r * 6, r * 6 + 6)))
print(rss_mb() - start)
"""


def _grown_mb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_temporaries_freed_in_threads_do_not_stay_resident() -> None:
    fixed = _grown_mb("fixed")
    assert fixed < 40, fixed
    default = _grown_mb("default")
    if default < 60:
        pytest.skip(f"this libc did not ratchet here ({default} MB without the fix): nothing to compare")
    assert fixed < default / 3, (fixed, default)


def test_an_operators_own_tunable_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.allocator import return_large_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_blocks() is False


ARENAS_PROBE = r"""
import ctypes, sys, tempfile, threading
if sys.argv[1] == "limited":
    from proxy.allocator import limit_arenas
    assert limit_arenas()
held = []
together = threading.Barrier(8)
def work():
    together.wait()  # all eight alive at once: a thread that exited would hand its arena to the next one
    held.append([bytearray(2000) for _ in range(200)])  # above pymalloc's 512 bytes: glibc's malloc, in this thread's arena
    together.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r", suffix=".xml") as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    print(out.read().count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", ARENAS_PROBE, mode], capture_output=True, text=True, timeout=60, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_share_at_most_two_arenas() -> None:
    """malloc_info lists one heap per arena: eight allocating threads make more without the cap, two with it."""
    from proxy.allocator import ARENA_MAX

    limited = _arenas("limited")
    assert limited <= ARENA_MAX, limited
    default = _arenas("default")
    if default <= ARENA_MAX:
        pytest.skip(f"this libc made only {default} arena(s) for eight threads: nothing to compare")
    assert limited < default


def test_an_operators_own_arena_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.allocator import limit_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas() is False
