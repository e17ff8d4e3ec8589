"""What blocks Thermostat's event loop: a stall finder under closed-loop load.

    .venv/bin/python -m bench.overhead.stalls [--concurrency 50] [--seconds 20] [--stall-ms 20]

Runs the real app in this process (uvicorn + uvloop, as `thermostat serve` does) in front of
bench/overhead/fake_upstream.py, drives it with wrk, and watches the loop from a thread: a
coroutine stamps a heartbeat every 2 ms, and whenever the stamp is older than `--stall-ms`
the thread records the loop thread's Python stack (once per stall). Garbage collections are
timed through `gc.callbacks` (a collection holds the GIL, so the thread cannot sample it).
Writes bench/results/stalls-<date>.md: stalls by duration, the stacks seen in them, GC pauses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import gc
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench.overhead.loadgen import request_body
from bench.overhead.run import PY, RESULTS, ROOT, free_port


class Watch:
    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.beat = time.perf_counter()
        self.stalls: list[float] = []
        self.stacks: collections.Counter[str] = collections.Counter()
        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_t0 = 0.0
        self.loop_thread = threading.get_ident()
        self.stop = False

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.perf_counter()
            await asyncio.sleep(0.002)

    def gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_t0))

    def run(self) -> None:
        sampled_for = 0.0
        last = self.beat
        while not self.stop:
            time.sleep(0.001)
            beat = self.beat
            if beat != last:  # the loop came back: how long was it away?
                if beat - last > self.stall_s:
                    self.stalls.append(beat - last)
                last = beat
            if time.perf_counter() - beat > self.stall_s and beat != sampled_for:
                sampled_for = beat
                frame = sys._current_frames().get(self.loop_thread)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-8:]
                    self.stacks["\n".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack)] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--stall-ms", type=float, default=20.0)
    a = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("needs wrk (apt-get install wrk)", file=sys.stderr)
        return 1
    import uvicorn
    import uvloop

    from proxy.app import create_app
    from proxy.config import load_config
    from proxy.edge.serving import ServingConfig

    tmp = Path(tempfile.mkdtemp(prefix="thermostat-stalls-"))
    up_port, port = free_port(), free_port()
    (tmp / "data").mkdir()
    cfg = tmp / "thermostat.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp / "data"}"\n[[upstreams]]\nname = "fake"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
                   'models = ["*"]\n[optimization]\nenabled = true\nmode = "general"\npolicy = "thompson_gaussian"\n'
                   "[admin]\nallow_unauthenticated = true\n")
    upstream = subprocess.Popen([PY, "-m", "bench.overhead.fake_upstream", "--port", str(up_port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = load_config(cfg)
    watch = Watch(a.stall_ms / 1000)
    server = uvicorn.Server(ServingConfig(create_app(config), server=config.server, host="127.0.0.1", port=port, loop="none",
                                          lifespan="on", log_level="warning", access_log=False))
    body = tmp / "body.json"
    body.write_bytes(request_body(False))
    lua = tmp / "post.lua"
    lua.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = io.open("{body}"):read("*a")\n')
    result: dict[str, str] = {}

    async def drive() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        gc.collect()
        gc.freeze()
        gc.callbacks.append(watch.gc_callback)
        threading.Thread(target=watch.run, daemon=True).start()
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{a.concurrency}", f"-d{a.seconds:.0f}s", "--latency", "-s", str(lua),
            f"http://127.0.0.1:{port}/v1/chat/completions", stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        result["wrk"] = out.decode()
        watch.stop = True
        server.should_exit = True

    async def both() -> None:
        beat = asyncio.ensure_future(watch.heartbeat())
        await asyncio.gather(server.serve(), drive())
        beat.cancel()

    try:
        uvloop.run(both())
    finally:
        upstream.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    gc.callbacks.remove(watch.gc_callback)
    pauses = sorted(watch.gc_pauses, key=lambda x: -x[1])
    by_gen = collections.Counter(g for g, _ in watch.gc_pauses)
    lines = [f"# Event-loop stalls of Thermostat under closed-loop c={a.concurrency} (non-stream, wrk, {a.seconds:g} s)", "",
             f"Command: `.venv/bin/python -m bench.overhead.stalls {' '.join(argv or sys.argv[1:])}` "
             f"({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC). A stall = the loop's 2 ms heartbeat older than {a.stall_ms:g} ms; "
             "the loop thread's Python stack is sampled once per stall.", "",
             "wrk:", "", "```", result.get("wrk", "").strip(), "```", "",
             f"Stalls: {len(watch.stalls)}; longest "
             + ", ".join(f"{x * 1000:.0f}" for x in sorted(watch.stalls, reverse=True)[:10]) + " ms.", "",
             f"Garbage collections: {dict(sorted(by_gen.items()))} by generation; longest: "
             + ", ".join(f"gen {g} {s * 1000:.1f} ms" for g, s in pauses[:8]), "", "## Stacks seen in stalls", ""]
    for stack, n in watch.stacks.most_common(12):
        lines += [f"{n} ×", "", "```", stack, "```", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"stalls-{dt.date.today().isoformat()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
