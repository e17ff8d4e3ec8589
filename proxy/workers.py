"""Several worker processes on one port (`thermostat serve --workers N`).

uvicorn's supervisor forks N workers; each builds its own app from the validated
config the parent passes in the environment (so every worker runs exactly what
`check-config` would print). What must be shared between workers is shared the same
way as between replicas: budget, posterior and rollback through Redis (so
`storage.redis_url` is required), the decision log in one database. Each worker
claims a numbered slot with a file lock for its private PostgreSQL spool, so a
restarted worker takes over (and replays) the spool of the one it replaces.
Prometheus runs in multiprocess mode: `/metrics` on any worker reports every
worker's counters and histograms.

How many workers `serve` runs is `proxy.config.worker_count` (`[server] workers`,
"auto" by default) over `usable_cores()`.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

import msgspec

from proxy.config import Config, ConfigError

ENV_CONFIG = "THERMOSTAT_WORKER_CONFIG"
ENV_SUPERVISOR = "THERMOSTAT_SUPERVISOR_PID"
MAX_SLOTS = 256
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_held_locks: list[int] = []  # file descriptors kept open for the life of the worker


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup v2
    CPU quota (a container's `--cpus`), which `os.cpu_count()` ignores; at most `MAX_SLOTS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, min(cores, MAX_SLOTS))


def prepare(config: Config, workers: int) -> str | None:
    """In the parent, before uvicorn forks: hand the config down, set up metrics.

    Returns the Prometheus folder it created (the caller removes it after the run), or None
    when PROMETHEUS_MULTIPROC_DIR was given. `proxy.config.validate_workers` has already
    refused several workers without Redis.
    """
    if workers > 1 and not config.storage.redis_url:
        raise ConfigError("server.workers > 1 needs storage.redis_url")  # validate_workers says why; this guards other callers
    os.environ[ENV_CONFIG] = msgspec.json.encode(config).decode()
    os.environ[ENV_SUPERVISOR] = str(os.getpid())
    created = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        created = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="thermostat-metrics-")
    Path(config.server.data_dir, "workers").mkdir(parents=True, exist_ok=True)
    return created


def die_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies.

    A supervisor killed with -9 cannot stop its workers, and an orphaned worker would go on
    serving the port, holding a budget lease and a spool slot with nobody to restart or stop
    it. SIGTERM, not SIGKILL: the worker still finishes its requests, flushes its log and
    hands its lease back.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    supervisor = int(os.environ.get(ENV_SUPERVISOR, "0") or 0)
    if supervisor and os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def claim_slot(data_dir: Path) -> int:
    """The lowest free slot number; its lock is held until the process exits."""
    folder = data_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        fd = os.open(folder / f"worker-{slot}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_locks.append(fd)
        return slot
    raise RuntimeError(f"no free worker slot in {folder}")


def app_from_env() -> object:
    """uvicorn factory, called in each worker process."""
    import gc

    from proxy.allocator import limit_arenas, return_large_blocks
    from proxy.app import create_app
    from proxy.runtime import Runtime

    die_with_supervisor()
    return_large_blocks()
    limit_arenas()
    config = msgspec.json.decode(os.environ[ENV_CONFIG], type=Config)
    data_dir = Path(config.server.data_dir)
    slot = claim_slot(data_dir)
    runtime = Runtime(config, spool_dir=data_dir / "workers" / f"worker-{slot}" / "spool")
    app = create_app(config, runtime)
    gc.collect()
    gc.freeze()
    return app
