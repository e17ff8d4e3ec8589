"""The request pipeline's listeners: one ordered list, assembled once by the composition root.

Pinned here: the order `proxy.runtime.outcome_listeners` declares, that the edge calls them in
exactly that order with one `Finished` record per decided request (an async one awaited before
the next), and that docs/architecture.md lists the same order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.edge import Finished, Listener
from proxy.runtime import Runtime
from tests.edge.test_upstream_transport import config
from tests.support.memory_transport import CannedResponse, MemoryTransport, chat_json

ORDER = [
    "decider.observe",
    "conservative.on_outcome",
    "registry.complete",
    "apply_pending_feedback",
    "metrics",
    "recorder.submit",
    "answers.on_answer",
    "span",
]
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_composition_root_declares_the_listener_order(tmp_path: Path) -> None:
    rt = Runtime(config(tmp_path))
    assert [listener.name for listener in rt.edge.listeners] == ORDER
    assert rt.edge.listeners is rt.listeners  # built once, handed to the edge as is


def test_docs_list_the_listeners_in_the_code_order(tmp_path: Path) -> None:
    """docs/architecture.md's step 7 names the listeners as the code does: after "Listeners, in order:",
    the first name in backticks of each part between arrows."""
    text = " ".join(ARCHITECTURE.read_text().split())
    found = re.search(r"Listeners, in order[^:]*:(.*?)\.(?:\s|$)", text)
    assert found is not None
    named = [re.findall(r"`([^`]+)`", part)[0] for part in found.group(1).split("→")]
    assert named == [listener.name for listener in Runtime(config(tmp_path)).listeners]


class Spy:
    """Wraps a listener and notes when it was called (and, for an async one, when it finished)."""

    def __init__(self, inner: Listener, calls: list[str]) -> None:
        self.inner, self.calls, self.name = inner, calls, inner.name

    def __call__(self, done: Finished) -> Awaitable[None] | None:
        self.calls.append(self.name)
        pending = self.inner(done)
        if pending is None:
            return None

        async def finish() -> None:
            await asyncio.sleep(0)  # another listener starting now would show up before the end mark
            await pending
            self.calls.append(f"/{self.name}")

        return finish()


class Last:
    """A listener after the declared ones: keeps the record it is handed."""

    name = "test.last"

    def __init__(self) -> None:
        self.seen: list[Finished] = []

    def __call__(self, done: Finished) -> None:
        self.seen.append(done)


def test_the_edge_calls_the_listeners_in_order_with_one_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEM_UPSTREAM_KEY", "sk-operator")
    transport = MemoryTransport(lambda req: CannedResponse(200, [chat_json("Hello there.")]))
    calls: list[str] = []
    last = Last()

    async def scenario() -> None:
        rt = Runtime(config(tmp_path), transport=transport)
        rt.edge = dataclasses.replace(rt.edge, listeners=(*(Spy(listener, calls) for listener in rt.listeners), last))
        app = create_app(rt.config, rt)
        await rt.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi."}]},
                                      headers={"x-thermostat-key": "client-7"})
            assert r.status_code == 200
        finally:
            await rt.stop()

    asyncio.run(scenario())
    assert calls == [ORDER[0], f"/{ORDER[0]}", *ORDER[1:]]  # the decider's observe is awaited before the monitor hears
    (done,) = last.seen
    assert done.status == 200 and done.key == "client-7" and done.summary.content == "Hello there."
    assert done.outcome.status == 200 and done.outcome.request_id == done.decision.request_id
