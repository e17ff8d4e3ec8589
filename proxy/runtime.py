"""Wiring: everything one Thermostat process holds, built from a validated Config.

The edge and the control API read from this object; nothing here runs on import.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from policies.records import Decision, Outcome, RequestContext
from proxy.config import Config
from proxy.decider import Decider, PassthroughDecider
from proxy.metrics import Metrics
from proxy.recorder import DecisionRegistry, Recorder
from proxy.sse import ResponseSummary
from proxy.store.sqlite import SqliteSink
from proxy.upstream import UpstreamPool

log = logging.getLogger("thermostat")


def _basic_context(doc: dict[str, Any], *, task_type: str, endpoint: str, upstream: str = "") -> RequestContext:
    temperature = doc.get("temperature")
    max_tokens = doc.get("max_completion_tokens") or doc.get("max_tokens")
    messages = doc.get("messages")
    return RequestContext(
        task_type=task_type,
        model=str(doc.get("model")),
        endpoint=endpoint,
        prompt_tokens_est=0,
        message_count=len(messages) if isinstance(messages, list) else 0,
        has_tools=bool(doc.get("tools")),
        json_mode=False,
        stream=doc.get("stream") is True,
        client_temperature=float(temperature) if temperature is not None else None,
        client_max_tokens=int(max_tokens) if max_tokens is not None else None,
        upstream=upstream,
    )


class Runtime:
    def __init__(self, config: Config, *, decider: Decider | None = None, transport: str = "aiohttp") -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.pool = UpstreamPool.from_settings(config.upstreams, transport)
        self.registry = DecisionRegistry()
        self.decider: Decider = decider or PassthroughDecider()
        data_dir = Path(config.server.data_dir)
        self.sink = SqliteSink(data_dir / "decisions.sqlite3")
        st = config.storage
        self.recorder = Recorder(
            self.sink,
            queue_size=st.queue_size,
            batch_size=st.batch_size,
            flush_interval_s=st.flush_interval_s,
            on_drop=self.metrics.queue_dropped.inc,
            on_written=self.metrics.written.inc,
        )
        self.metrics.queue_depth.set_function(self.recorder.queue.qsize)
        self.build_context = _basic_context

    async def start(self) -> None:
        await self.recorder.start()
        log.info("thermostat started: %d upstream(s), decision log %s", len(self.pool.upstreams), self.sink.name)

    async def stop(self) -> None:
        await self.recorder.stop()
        await self.pool.aclose()

    @property
    def ready(self) -> bool:
        return self.recorder.ready and bool(self.pool.upstreams)

    def auto_quality(self, outcome: Outcome, summary: ResponseSummary, ctx: RequestContext) -> float | None:
        return None

    def context_features(self, ctx: RequestContext) -> dict[str, object]:
        return {}

    def arm_label(self, decision: Decision) -> str:
        return "baseline" if decision.arm_index is None else str(decision.arm_index)
