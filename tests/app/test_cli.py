"""The command line a newcomer meets first: the same refusal from `check-config` as from
`serve`, and a busy port named with the flag that moves it before anything says it listens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("THERMOSTAT_ADMIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other process listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def test_check_config_without_upstreams_refuses_as_serve_does(tmp_path: Path) -> None:
    checked = _cli("check-config", cwd=tmp_path)  # no config.toml here: the defaults, which have no upstream
    served = _cli("serve", cwd=tmp_path)
    assert checked.returncode == served.returncode == 2
    assert "no [[upstreams]] configured" in checked.stderr
    assert checked.stderr.strip().splitlines()[-1] == served.stderr.strip().splitlines()[-1]
    assert "config OK" not in checked.stderr


def test_serve_names_a_busy_port_and_the_flag(tmp_path: Path, busy_port: int) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n[admin]\nallow_unauthenticated = true\n'
                      f'[server]\ndata_dir = "{tmp_path}"\n')
    out = _cli("serve", "--config", str(config), "--port", str(busy_port), cwd=tmp_path)
    assert out.returncode == 2
    assert f"port {busy_port} on 127.0.0.1 is busy" in out.stderr and "--port" in out.stderr
    assert "listening" not in out.stdout
    assert "Traceback" not in out.stderr


def test_demo_names_its_busy_port_before_saying_anything_listens(tmp_path: Path, busy_port: int) -> None:
    out = _cli("demo", "--port", str(busy_port), "--simulator-port", str(free_port()), "--traffic", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert f"port {busy_port} on 127.0.0.1 is busy" in out.stderr and "with --port" in out.stderr
    assert "listening" not in out.stdout and "demo:" not in out.stdout


def test_demo_names_a_busy_simulator_port_and_its_flag(tmp_path: Path, busy_port: int) -> None:
    out = _cli("demo", "--port", str(free_port()), "--simulator-port", str(busy_port), "--traffic", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert f"port {busy_port} on 127.0.0.1 is busy" in out.stderr and "--simulator-port" in out.stderr
    assert "listening" not in out.stdout
    assert "Traceback" not in out.stderr


def test_simulate_names_a_busy_port(tmp_path: Path, busy_port: int) -> None:
    out = _cli("simulate", "--port", str(busy_port), cwd=tmp_path)
    assert out.returncode == 2 and f"port {busy_port} on 127.0.0.1 is busy" in out.stderr and "--port" in out.stderr
