"""The bare passthrough floor: an aiohttp server forwarding with one aiohttp ClientSession, no logic.

    python -m bench.overhead.floor --port 9101 --upstream http://127.0.0.1:9100
"""

import argparse

import aiohttp
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(request.method, request.app["upstream"] + request.path_qs, headers=headers, data=body) as up:
        out = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def on_startup(app: web.Application) -> None:
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False)


async def on_cleanup(app: web.Application) -> None:
    await app["session"].close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9101)
    p.add_argument("--upstream", default="http://127.0.0.1:9100")
    a = p.parse_args()
    app = web.Application()
    app["upstream"] = a.upstream.rstrip("/")
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", forward)
    import uvloop

    uvloop.install()
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, backlog=4096)
