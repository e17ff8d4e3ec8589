"""Run the real Thermostat app on a loopback port in a background thread."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from proxy.app import create_app
from proxy.cli import forwarding_options
from proxy.config import Config
from proxy.edge import ServingConfig
from proxy.runtime import Runtime
from tests.support.loop_thread import started_in_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningThermostat:
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    runtime: Runtime

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's own event loop (to inspect or flush state)."""
        loop = self.runtime._loop  # type: ignore[attr-defined]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def flush(self, settle_s: float = 0.05) -> None:
        """Wait for responses' bookkeeping (it runs just after the last byte), then write."""
        time.sleep(settle_s)
        self.call(self._drain_learning())
        self.call(self.runtime.recorder.flush())
        self.call(self._settle_policy())

    async def _drain_learning(self) -> None:
        """Run the batch step on what is queued (proxy/decision/batch.py: otherwise within 50 ms)."""
        self.runtime.drain_learning()

    async def _settle_policy(self) -> None:
        """Rebuild every stale posterior table now, until the policy's version holds still.

        The background refresher otherwise rebuilds them at its own pace (and only once a
        read finds them stale), and a test that compares an endpoint's propensities with its
        own would race it."""
        policy = self.runtime.policy
        settle = getattr(policy, "settle", None)
        seen = None
        while seen != policy.version:
            seen = policy.version
            await asyncio.sleep(0.02)  # bookkeeping still in flight lands first
            if settle is not None:
                settle()

    def stop(self, timeout_s: float = 60) -> None:
        """Ask uvicorn to exit and wait for the lifespan's shutdown (journal closed, its lock released).

        A test that restarts on the same data_dir must not start before this one let go of the
        journal's lock: on a loaded 2-core machine shutdown has taken longer than 15 s."""
        self.server.should_exit = True
        self.thread.join(timeout_s / 2)
        if self.thread.is_alive():
            # uvicorn's graceful wait (open connections, background tasks) has been seen to outlast this
            # once in a full-suite run, never alone: force it, as a second SIGTERM would; the lifespan's
            # shutdown (journal closed, lock released) still runs.
            self.server.force_exit = True
            self.thread.join(timeout_s / 2)
        if self.thread.is_alive():
            raise AssertionError(f"thermostat did not stop within {timeout_s} s\n{self._stacks()}")

    def _stacks(self) -> str:
        """Where a stuck shutdown waits: the server thread's frame and every task of its loop."""
        out = io.StringIO()
        frame = sys._current_frames().get(self.thread.ident or -1)
        if frame is not None:
            out.write("server thread:\n" + "".join(traceback.format_stack(frame)))
        loop = self.runtime._loop  # type: ignore[attr-defined]
        for _ in range(3):  # the set may change while the loop thread runs
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                tasks = []
        for task in tasks:
            out.write(f"\ntask {task.get_name()} {task.get_coro()!r}:\n")
            task.print_stack(file=out)
        return out.getvalue()


def start_thermostat(config: Config, runtime: Runtime | None = None) -> RunningThermostat:
    rt = runtime or Runtime(config)
    app = create_app(config, rt)
    port = free_port()
    server = uvicorn.Server(ServingConfig(app, server=config.server, host="127.0.0.1", port=port, loop="asyncio", lifespan="on", log_level="warning",
                                          **forwarding_options(config.server)))

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        rt._loop = loop  # type: ignore[attr-defined]
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 15
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("thermostat did not start")
        time.sleep(0.01)
    return RunningThermostat(server, thread, port, rt)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM (a graceful stop, as an operator's), then kill after `grace_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 40) -> None:
    """Poll a readiness URL of a server started as a subprocess; fail with its stderr if it died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


@contextmanager
def simulator_in_thread(seed: int = 0, time_scale: float = 0.0, **options: Any) -> Iterator[Any]:
    """The bundled simulator (proxy/demo/simulator_server.py) on a loopback port, its own loop in a thread."""
    from proxy.demo import start_simulator

    with started_in_thread(lambda: start_simulator("127.0.0.1", 0, seed=seed, time_scale=time_scale, **options),
                           lambda sim: sim.close()) as sim:
        yield sim


def run_demo_traffic(base: str, rate_per_s: float, seconds: float, **options: Any) -> None:
    """`thermostat demo`'s simulated clients (proxy/demo/traffic.py) against `base` for `seconds` (with `requests=`: until that many are answered, `seconds` at most)."""
    from proxy.demo import traffic

    async def drive() -> None:
        try:
            await asyncio.wait_for(traffic.run(base, rate_per_s, **options), timeout=seconds)
        except TimeoutError:
            pass

    asyncio.run(drive())
