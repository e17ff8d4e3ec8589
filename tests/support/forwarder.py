"""A loopback TCP proxy in front of a server (Redis in the tests) that can slow, kill or cut it."""

from __future__ import annotations

import asyncio
import threading
import time

from tests.support.servers import free_port


class Forwarder:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port> on its own event loop thread.

    ``delay_s`` holds every reply chunk back that long (order kept, chunks in flight
    overlap, as on a slow link); `kill` drops every open connection and keeps
    listening (CLIENT KILL from outside, a network blip); `cut` also closes the port
    until `start` again (the server gone).
    """

    def __init__(self, target_port: int = 6379, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delay_s = delay_s
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool = False) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send_later() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send_later()) if delayed else None
        try:
            while data := await reader.read(65536):
                if sender is not None:
                    queue.put_nowait((time.monotonic() + self.delay_s, data))
                else:
                    writer.write(data)
                    await writer.drain()
            if sender is not None:
                queue.put_nowait((0.0, b""))
                await sender
        except OSError:  # the other side was cut
            pass
        finally:
            if sender is not None:
                sender.cancel()
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, delayed=self.delay_s > 0))
        except (OSError, asyncio.CancelledError):  # killed, or `close`: asyncio's stream callback
            pass  # would otherwise report the cancelled handler as an error
        finally:
            self._writers -= {writer, up_writer}

    def start(self) -> None:
        async def go() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def kill(self) -> int:
        """Drop every open connection (both sides); returns how many were dropped."""

        async def go() -> int:
            writers = list(self._writers)
            for w in writers:
                w.transport.abort()
            self._writers.clear()
            return len(writers)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def cut(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        self.kill()

    def close(self) -> None:
        self.cut()

        async def cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
