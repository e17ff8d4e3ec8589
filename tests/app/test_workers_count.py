"""How many worker processes `serve` runs: `[server] workers` ("auto" by default), the flag, the cores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, build_config, worker_count
from proxy.workers import MAX_SLOTS, usable_cores

ROOT = Path(__file__).resolve().parents[2]
REDIS = {"storage": {"redis_url": "redis://127.0.0.1:6379/0"}}


def test_auto_is_one_per_core_with_redis_and_one_without_saying_why() -> None:
    assert build_config({}, environ={}).server.workers == "auto"
    assert worker_count(build_config(REDIS, environ={}), 8) == (8, "")
    assert worker_count(build_config(REDIS, environ={}), 1) == (1, "")
    alone, why = worker_count(build_config({}, environ={}), 8)
    assert alone == 1 and "8 here" in why and "REDIS_URL" in why and "workers = 1" in why
    assert worker_count(build_config({}, environ={}), 1) == (1, "")  # nothing more to get
    assert worker_count(build_config({"server": {"workers": 1}}, environ={}), 8) == (1, "")  # asked for: no advice


def test_a_number_is_taken_as_given_and_several_need_redis() -> None:
    assert worker_count(build_config({"server": {"workers": 3}, **REDIS}, environ={}), 8) == (3, "")
    with pytest.raises(ConfigError, match=r"'server.workers': 3 needs storage.redis_url"):
        build_config({"server": {"workers": 3}}, environ={})
    with pytest.raises(ConfigError, match=r"'server.workers': 0 \(allowed"):
        build_config({"server": {"workers": 0}, **REDIS}, environ={})
    with pytest.raises(ConfigError, match=r"'server.workers'"):
        build_config({"server": {"workers": "many"}}, environ={})
    # REDIS_URL from the environment counts as configured
    assert build_config({"server": {"workers": 3}}, environ={"REDIS_URL": "redis://127.0.0.1:6379/0"}).server.workers == 3


def test_usable_cores_follows_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(tmp_path / "absent") == min(affinity, MAX_SLOTS)
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == min(affinity, MAX_SLOTS)
    cpu_max.write_text("150000 100000\n")  # docker --cpus 1.5: two workers at most
    assert usable_cores(cpu_max) == min(affinity, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1


def test_the_flag_overrides_the_file_under_the_same_rule(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nworkers = 1\n[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "THERMOSTAT_ADMIN_TOKEN")}

    def serve(*flag: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", "9", *flag],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)

    refused = serve("--workers", "2")
    assert refused.returncode == 2 and "'server.workers': 2 needs storage.redis_url" in refused.stderr
    bad = serve("--workers", "lots")
    assert bad.returncode == 2 and "neither \"auto\" nor a whole number" in bad.stderr


@pytest.mark.skipif(usable_cores() < 2, reason="one usable core: auto has nothing more to offer")
def test_auto_without_redis_says_at_start_up_why_it_runs_one_worker(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n[admin]\nallow_unauthenticated = true\n')
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "THERMOSTAT_ADMIN_TOKEN")}
    with socket.socket() as holder:  # a busy port: start-up stops right after the worker count
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert f'1 worker process: [server] workers = "auto" runs one per core ({usable_cores()} here)' in out.stderr
    assert f"port {port} on 127.0.0.1 is busy" in out.stderr
