"""The storage interface: one `LogStore` protocol, implemented by SQLite and PostgreSQL.

Writers hand batches of records to `write`; it is idempotent (decisions keyed by
request id: a replayed decision is ignored; feedback keyed by request id:
upserted; audit and rollout events keyed by their own generated id), so a batch
written twice never duplicates anything. Readers get `DecisionRow`s (one logged
decision joined with its delayed feedback), newest first.

Secrets never reach these records: request headers (Authorization, API keys) are
not part of any of them.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from policies.quality import client_error
from policies.records import Params
from proxy.store.entries import FeedbackEntry, LogEntry


def _new_id() -> str:
    return str(uuid.uuid4())


class AuditRecord(msgspec.Struct, tag="audit", kw_only=True):
    """One control-plane action (who changed what, with before/after snapshots)."""

    at: float  # unix seconds
    actor: str
    action: str
    target: str = ""
    before: Any = None
    after: Any = None
    id: str = msgspec.field(default_factory=_new_id)  # uuid; makes a replay idempotent


class EventRecord(msgspec.Struct, tag="event", kw_only=True):
    """One rollout / rollback event (maps 1:1 from guards.rollout.RolloutEvent)."""

    at: float  # unix seconds
    kind: str  # rollback, resume, promote, set_phase, disable, enable, breach
    from_phase: str | None = None
    to_phase: str | None = None
    reason: str = ""
    evidence: dict[str, Any] = {}
    actor: str | None = None
    id: str = msgspec.field(default_factory=_new_id)


StoreRecord = LogEntry | FeedbackEntry | AuditRecord | EventRecord
"""Everything `LogStore.write` (and the spool) accepts."""


class DecisionRow(msgspec.Struct, kw_only=True):
    """One logged decision with its outcome columns and the joined delayed feedback."""

    request_id: str
    timestamp: float  # decision time, unix seconds
    task_type: str
    model_name: str
    upstream: str
    context_fingerprint: int
    context_features: dict[str, Any]
    chosen_params: Params
    baseline_params: Params
    policy_params: Params | None
    log_propensity: float
    policy_log_propensity: float | None
    arm_index: int | None
    policy: str
    policy_version: str
    mode: str
    guard_notes: tuple[str, ...]
    status: int
    error_class: str | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    quality: float | None
    reward: float | None
    outcome: dict[str, Any]
    prompt: str | None = None
    feedback_quality: float | None = None
    feedback_reward: float | None = None
    feedback_source: str | None = None  # explicit | judge | implicit
    validator_reason: str | None = None  # why the answer failed its schema check (schema paths, error kinds)
    cost_usd: float | None = None  # usage at the model's price; None: no usage reported or no price known

    @property
    def propensity(self) -> float:
        return math.exp(self.log_propensity)

    @property
    def judged(self) -> bool:
        """False for a client's own 4xx: its row stays in the log but is no verdict on the parameters
        (`proxy.decision.outcome.judged`), even if someone posts feedback on it."""
        return not client_error(self.status, self.chosen_params, self.baseline_params)

    @property
    def effective_quality(self) -> float | None:
        """Delayed feedback wins over the automatic score."""
        if not self.judged:
            return None
        return self.feedback_quality if self.feedback_quality is not None else self.quality

    @property
    def effective_reward(self) -> float | None:
        if not self.judged:
            return None
        return self.feedback_reward if self.feedback_reward is not None else self.reward


class StoreStatus(msgspec.Struct, kw_only=True):
    kind: str  # "sqlite" or "postgres"
    connected: bool
    last_error: str | None = None
    spool_batches: int = 0  # batches waiting in the local spool for the database
    spool_entries: int = 0
    rows_written: int = 0  # records written to the database by this process
    dead_letter_batches: int = 0  # batches the database refused (kept in a side file)


class StoreUnavailable(RuntimeError):
    """A read could not be served because the database is unreachable."""


class Sink(Protocol):
    """What the recorder needs: open, write batches, close."""

    name: str

    async def open(self) -> None: ...

    async def write(self, entries: Sequence[StoreRecord]) -> None:
        """Write one batch; idempotent on the request id so a replay never duplicates."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class LogStore(Sink, Protocol):
    """The decision log plus the reads the control API and off-policy evaluation use."""

    async def fetch_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DecisionRow]:
        """Decisions with `since <= timestamp < until`, newest first."""
        ...

    async def get_decision(self, request_id: str) -> DecisionRow | None: ...

    async def count_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
    ) -> int: ...

    async def append_audit(self, record: AuditRecord) -> None: ...

    async def fetch_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        """Newest first."""
        ...

    async def get_audit(self, audit_id: str) -> AuditRecord | None:
        """One audit entry by id (None when absent): lets a check prove a write can be read back."""
        ...

    async def count_audit(self) -> int: ...

    async def append_event(self, record: EventRecord) -> None: ...

    async def fetch_events(self, limit: int = 100, since: float | None = None) -> list[EventRecord]:
        """Newest first; `since` keeps events with `at >= since`."""
        ...

    async def prune(self, older_than_s: float, batch_size: int = 5000) -> int:
        """Delete decisions (and their feedback) older than `older_than_s` seconds, in bounded batches."""
        ...

    def status(self) -> StoreStatus: ...


# --- helpers shared by the implementations -------------------------------------------------

_json_decoder = msgspec.json.Decoder()

JSON_COLUMNS = ("context_features", "chosen_params", "baseline_params", "policy_params", "guard_notes", "outcome")


def storable(text: str) -> bool:
    """Whether both decision logs can hold `text`: PostgreSQL text and JSONB refuse NUL, and a
    lone surrogate (a JSON string may carry one, `"\\ud800"`) has no UTF-8 form for either store.
    The edge refuses such client values so that no answered request loses its row."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def log_propensity(p: float | None) -> float | None:
    """ln p (−inf for p = 0) as stored in `log_propensity` columns."""
    if p is None:
        return None
    return math.log(p) if p > 0 else float("-inf")


def decode_json(value: Any) -> Any:
    """JSON text/bytes from a column -> Python value (already-decoded values pass through)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return _json_decoder.decode(bytes(value) if isinstance(value, memoryview) else value)
    return value


def to_decision_row(row: dict[str, Any]) -> DecisionRow:
    """A column mapping (JSON columns as text or decoded values) -> DecisionRow."""
    doc = dict(row)
    for key in JSON_COLUMNS:
        if key in doc:
            doc[key] = decode_json(doc[key])
    return msgspec.convert(doc, DecisionRow, strict=False)


def split_records(
    entries: Sequence[StoreRecord],
) -> tuple[list[LogEntry], list[FeedbackEntry], list[AuditRecord], list[EventRecord]]:
    """Split a batch by kind; feedback keeps only the last entry per request id (upsert order)."""
    decisions: list[LogEntry] = []
    feedback: dict[str, FeedbackEntry] = {}
    audits: list[AuditRecord] = []
    events: list[EventRecord] = []
    for e in entries:
        if isinstance(e, LogEntry):
            decisions.append(e)
        elif isinstance(e, FeedbackEntry):
            feedback.pop(e.request_id, None)
            feedback[e.request_id] = e
        elif isinstance(e, AuditRecord):
            audits.append(e)
        elif isinstance(e, EventRecord):
            events.append(e)
        else:
            raise TypeError(f"cannot store {type(e).__name__}")
    return decisions, list(feedback.values()), audits, events
