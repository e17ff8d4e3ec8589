"""glibc's malloc in a long-running server: large temporaries go back to the system when freed.

glibc serves an allocation above its mmap threshold (128 KB to start with) with a mapping of
its own and unmaps it on free. The threshold is dynamic, though: once such a block is freed
the threshold rises to that block's size (up to 32 MB), and from then on blocks of that size
come from the allocating thread's arena, where, once freed, they stay resident as free space
the arena seldom hands back. The OPE bootstrap behind the promotion evidence
(`proxy/learning/evidence.py`, every `ope_interval_s` over up to 5,000 logged rows, in a
worker thread) allocates index and value arrays of about 10 MB each, so under steady load
the arenas of the executor's threads ratcheted up to ~270 MB of RSS that no Python object
held (tracemalloc saw 50-60 MB; bench/memory_plateau.py,
bench/results/memory-plateau-2026-12-07*.md). Setting the threshold turns the adjustment
off: blocks above `MMAP_THRESHOLD_BYTES` are always mapped and always returned.

An operator's own `MALLOC_MMAP_THRESHOLD_` (glibc's environment tunable) wins: it is left alone.

Arenas: glibc gives each new thread an arena of its own, up to eight per core, and memory a
thread frees stays in its arena for that thread's next allocations. A server process has a
handful of threads (the SQLite writer, the journal's fsync, the `asyncio.to_thread` pool),
each of which ends up holding its own slack. Limiting them to `ARENA_MAX` (2: the event
loop's and one shared by the others, the setting glibc's manual suggests for servers) kept
RSS 39-54 MB lower at the same load over 20 minutes (bench/memory_plateau.py, 100 requests/s:
`-arena2-20min.md` against the 30-minute run of the same day). The threads that share an arena do little
allocation, so the arena lock costs nothing measurable on the request path. An operator's
`MALLOC_ARENA_MAX` wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
# Above this a block is mapped on its own: the bootstrap's arrays and other multi-megabyte
# temporaries; request bodies, read buffers and the like stay in the arenas, where reuse is cheap.
MMAP_THRESHOLD_BYTES = 1 << 20
ENV_TUNABLE = "MALLOC_MMAP_THRESHOLD_"
M_ARENA_MAX = -8  # <malloc.h>
ARENA_MAX = 2
ENV_ARENAS = "MALLOC_ARENA_MAX"


def return_large_blocks() -> bool:
    """Fix this process's mmap threshold at `MMAP_THRESHOLD_BYTES`; False where it was not set
    (not glibc, or the operator set `MALLOC_MMAP_THRESHOLD_`)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_TUNABLE):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def limit_arenas() -> bool:
    """Cap this process's malloc arenas at `ARENA_MAX` (call before threads start); False where it was not set
    (not glibc, or the operator set `MALLOC_ARENA_MAX`)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_ARENAS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    return bool(mallopt(M_ARENA_MAX, ARENA_MAX))
