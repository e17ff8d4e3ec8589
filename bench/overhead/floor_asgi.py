"""The same bare passthrough as floor.py, but served by uvicorn + httptools as Thermostat is.

    python -m bench.overhead.floor_asgi --port 9102 --upstream http://127.0.0.1:9100

Why: floor.py is an aiohttp server. Thermostat's `/v1/*` edge is a plain ASGI app under
uvicorn, so the gap between the two floors is what the server stack costs, and only the
gap between this floor and Thermostat is Thermostat's own logic (bench/README.md,
"per chunk"). Same client side as floor.py: one aiohttp ClientSession, no logic.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp

HOP = {b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
RESPONSE_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.session is not None
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in HOP}
        query = scope.get("query_string", b"")
        url = self.upstream + scope["path"] + ("?" + query.decode("latin-1") if query else "")
        async with self.session.request(scope["method"], url, headers=headers, data=body or None) as up:
            out_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in up.headers.items() if k.lower() not in RESPONSE_HOP]
            await send({"type": "http.response.start", "status": up.status, "headers": out_headers})
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9102)
    p.add_argument("--upstream", default="http://127.0.0.1:9100")
    a = p.parse_args()
    uvicorn.run(Passthrough(a.upstream), host=a.host, port=a.port, loop="uvloop", http="httptools", lifespan="on",
                log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
