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
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import msgspec

from proxy.config import Config, ConfigError

ENV_CONFIG = "THERMOSTAT_WORKER_CONFIG"
MAX_SLOTS = 256

_held_locks: list[int] = []  # file descriptors kept open for the life of the worker


def prepare(config: Config, workers: int) -> None:
    """In the parent, before uvicorn forks: validate, hand the config down, set up metrics."""
    if workers > 1 and not config.storage.redis_url:
        raise ConfigError(
            "--workers > 1 needs storage.redis_url (REDIS_URL): the budget, the posterior and the rollback switch must be shared between worker processes"
        )
    os.environ[ENV_CONFIG] = msgspec.json.encode(config).decode()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="thermostat-metrics-")
    Path(config.server.data_dir, "workers").mkdir(parents=True, exist_ok=True)


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

    from proxy.app import create_app
    from proxy.runtime import Runtime

    config = msgspec.json.decode(os.environ[ENV_CONFIG], type=Config)
    data_dir = Path(config.server.data_dir)
    slot = claim_slot(data_dir)
    runtime = Runtime(config, spool_dir=data_dir / "workers" / f"worker-{slot}" / "spool")
    app = create_app(config, runtime)
    gc.collect()
    gc.freeze()
    return app
