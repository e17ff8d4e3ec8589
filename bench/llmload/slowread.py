"""Slow readers: N streamed requests whose clients read a few bytes per second.

    python -m bench.llmload.slowread --url http://127.0.0.1:9101/v1/chat/completions --clients 500 --seconds 30

Raw sockets with a small receive buffer (`SO_RCVBUF`, set before connecting so the window
stays small), so the kernel cannot soak up the answer on the client's behalf: whatever the
client has not read waits in the target (if it buffers) or further back (if it applies
backpressure). Each asks for a large, fast answer (`--tokens` at 100 tokens/s with `--pad`
bytes per chunk) and reads `--read-bytes` every second until `--seconds` have passed, then
closes. Prints one JSON object: connected, answered 200, bytes read. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit

from bench.llmload.loadgen import Shape, check_loopback, request_body


async def reader(host: str, port: int, path: str, body: bytes, key: str, a: argparse.Namespace, stats: dict[str, int], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf)
    # A network-sized MSS: on loopback (64 KB MSS) the target's kernel send buffer would grow to ~4 MB
    # and hide whether the target buffers; with 1460 it stays ~100 KB, as for a client on a network.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout=10)
        stats["connected"] += 1
        head = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        await loop.sock_sendall(sock, head + body)
        first = True
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, a.read_bytes), timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            if not data:
                stats["closed_by_target"] += 1
                break
            if first:
                first = False
                if data.startswith(b"HTTP/1.1 200"):
                    stats["status_200"] += 1
            stats["bytes_read"] += len(data)
            await asyncio.sleep(a.interval)
    except (OSError, TimeoutError):
        stats["errors"] += 1
    finally:
        sock.close()


async def run(a: argparse.Namespace) -> dict:
    u = urlsplit(a.url)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path or "/"
    body = request_body(Shape(ttft_ms=200, tps=100, tokens=a.tokens, chunk=4, stream=True, pad=a.pad))
    stats = {"clients": a.clients, "connected": 0, "status_200": 0, "bytes_read": 0, "closed_by_target": 0, "errors": 0}
    deadline = time.monotonic() + a.seconds
    tasks = []
    for _ in range(a.clients):
        tasks.append(asyncio.ensure_future(reader(host, port, path, body, a.key, a, stats, deadline)))
        await asyncio.sleep(a.ramp / max(1, a.clients))
    await asyncio.wait(tasks, timeout=a.seconds + 15)
    for t in tasks:
        t.cancel()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="slow-reading streaming clients")
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--seconds", type=float, default=30.0, help="how long every client stays connected")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which the clients connect")
    p.add_argument("--read-bytes", type=int, default=16, help="bytes read per --interval")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of each client socket")
    p.add_argument("--tokens", type=int, default=1000, help="answer length asked for (100 tokens/s, 4 per chunk)")
    p.add_argument("--pad", type=int, default=1024, help="bytes added to each chunk so buffering shows")
    p.add_argument("--key", default=os.environ.get("BENCH_API_KEY", "sk-bench-local"))
    a = p.parse_args(argv)
    check_loopback(a.url)
    if not (0 < a.seconds <= 300 and 0 < a.clients <= 5000):
        raise SystemExit("bounded runs only: --seconds in (0, 300], --clients in (0, 5000]")
    try:
        import uvloop

        out = uvloop.run(run(a))
    except ImportError:  # pragma: no cover
        out = asyncio.run(run(a))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
