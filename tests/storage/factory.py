"""Builders for fully populated storage records."""

from __future__ import annotations

import asyncio
import time
import uuid

from policies.records import Decision, Outcome, Params, RequestContext
from proxy.store import FeedbackEntry, LogEntry


def log_entry(
    request_id: str | None = None,
    *,
    created_at: float | None = None,
    task_type: str = "code",
    mode: str = "optimized",
    prompt: str | None = "write a sort function",
) -> LogEntry:
    rid = request_id or str(uuid.uuid4())
    ctx = RequestContext(
        task_type=task_type, model="gpt-x", endpoint="chat", prompt_tokens_est=42, message_count=2,
        has_tools=True, json_mode=False, stream=True, client_temperature=0.7, client_max_tokens=800,
        upstream="openai",
    )
    decision = Decision(
        request_id=rid, context=ctx, context_fingerprint=-(2**62) + 12345,
        sent=Params(temperature=0.3, max_tokens=600), baseline=Params(temperature=0.7, max_tokens=800),
        propensity=0.25, policy="thompson_gaussian", policy_version="ts-v3", mode=mode,
        created_at=time.time() if created_at is None else created_at,
        policy_choice=Params(temperature=0.2, max_tokens=500), policy_propensity=0.5, arm_index=7,
        guard_notes=("trust_region:clipped", "budget:ok"), budget_reserved=900,
    )
    outcome = Outcome(
        request_id=rid, status=200, latency_s=1.25, ttft_s=0.125, prompt_tokens=42, completion_tokens=300,
        finish_reason="stop", error_class=None, quality=0.8, reward=0.65, feedback=False,
    )
    return LogEntry(decision=decision, outcome=outcome, context_features={"len_bucket": 2, "tools": True}, prompt=prompt)


def feedback(request_id: str, quality: float = 0.9, reward: float | None = 0.7, received_at: float | None = None) -> FeedbackEntry:
    return FeedbackEntry(request_id=request_id, quality=quality, reward=reward, payload={"thumbs": "up", "score": quality},
                         received_at=time.time() if received_at is None else received_at)


class TcpProxy:
    """A loopback TCP forwarder that can be switched off (refuses and kills connections) and on again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            writer.transport.abort()
            up_writer.transport.abort()
