"""Recent decisions by request id: where feedback that arrives later finds its decision.

Lives in the decision room because feedback re-enters here; the shared-state layer
(proxy/learning/sync.py) extends it across replicas.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from policies.records import Decision, Outcome

# Decisions this process keeps for delayed feedback (about 1 KB each with their key, so ~20 MB full;
# bench/memory_plateau.py). Older ones are found in the decision log, or in Redis across replicas.
MAX_REGISTERED = 20_000


class _Registered(msgspec.Struct, array_like=True):
    decision: Decision
    outcome: Outcome | None = None


_encode_registered = msgspec.msgpack.Encoder().encode
_decode_registered = msgspec.msgpack.Decoder(_Registered).decode


class DecisionRegistry:
    """Recent decisions by request id, so delayed feedback finds its decision.

    Entries are kept msgpack-encoded: a few hundred bytes each and no object graph
    for the garbage collector to walk (100,000 live Decision/Outcome/RequestContext
    objects made full collections take tens of milliseconds on the event loop).
    Bounded (oldest evicted first) and time-limited; older decisions are found in
    the decision log, and the shared-state store extends the reach across replicas.
    """

    def __init__(self, max_entries: int = MAX_REGISTERED, ttl_s: float = 86_400.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def register(self, decision: Decision) -> None:
        self._items[decision.request_id] = _encode_registered(_Registered(decision))
        if len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def complete(self, decision: Decision, outcome: Outcome) -> None:
        if decision.request_id in self._items:
            self._items[decision.request_id] = _encode_registered(_Registered(decision, outcome))

    def get(self, request_id: str, now: float) -> tuple[Decision, Outcome | None] | None:
        raw = self._items.get(request_id)
        if raw is None:
            return None
        item = _decode_registered(raw)
        if now - item.decision.created_at > self.ttl_s:
            return None
        return item.decision, item.outcome

    def __len__(self) -> int:
        return len(self._items)
