"""Learning in batches (proxy/decision/batch.py): the conservative monitor's fold per batch equals the fold per request."""

from __future__ import annotations

import asyncio

import numpy as np

from guards import conservative as cm
from policies.records import Decision, Outcome, Params, RequestContext
from proxy.decision import OutcomeBatch

S = cm.ConservativeSettings()


def _traffic(seed: int, n: int, opt_quality: float, hold_quality: float) -> list[cm.Observation]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        holdout = rng.random() < 0.5
        q = float(np.clip((hold_quality if holdout else opt_quality) + 0.1 * rng.standard_normal(), 0.0, 1.0))
        task = "code" if rng.random() < 0.7 else "chat"
        out.append(cm.Observation(task, "holdout" if holdout else "optimized", q, float(np.exp(0.3 * rng.standard_normal())),
                                  cost=float(rng.integers(50, 500)), truncated=bool(rng.random() < 0.1), length=float(rng.integers(50, 500))))
    return out


def _one_by_one(batch: list[cm.Observation], state: cm.MonitorState, now: float) -> tuple[cm.MonitorState, list[cm.MonitorEvent]]:
    events: list[cm.MonitorEvent] = []
    for o in batch:
        state, more = cm.observe(state, S, task=o.task, mode=o.mode, quality=o.quality, latency_s=o.latency_s, now=now,
                                 cost=o.cost, truncated=o.truncated, length=o.length)
        events += more
    return state, events


def test_a_batch_folds_what_the_requests_one_by_one_fold() -> None:
    """With nothing to roll back, a batch lands on exactly the state of the same requests folded one at a time."""
    traffic = _traffic(3, 600, 0.7, 0.7)
    one, batched = cm.new_state(), cm.new_state()
    for start in range(0, len(traffic), 37):
        chunk = traffic[start : start + 37]
        one, _ = _one_by_one(chunk, one, float(start))
        batched, _ = cm.observe_many(batched, S, chunk, float(start))
    assert batched == one


def test_a_harmful_task_is_still_rolled_back_at_most_one_batch_later() -> None:
    traffic = [o for o in _traffic(1, 3000, 0.5, 0.7) if o.task == "code"]
    state, first_alone = cm.new_state(), None
    for i, o in enumerate(traffic):
        state, events = _one_by_one([o], state, float(i))
        if any(e.kind == "rollback" for e in events):
            first_alone = i
            break
    assert first_alone is not None
    state, size = cm.new_state(), 50
    for start in range(0, len(traffic), size):
        state, events = cm.observe_many(state, S, traffic[start : start + size], float(start))
        if any(e.kind == "rollback" for e in events):
            assert start <= first_alone < start + size  # the batch that holds the breach rolls back
            break
    assert cm.rolled_back(state, "code")


CTX = RequestContext("default", "m", "chat", 10, 1, False, False, False, None, None)


def _pair(i: int) -> tuple[Decision, Outcome]:
    return Decision(f"r{i}", CTX, 0, Params(), Params(), 1.0, "baseline", "v", "off", 0.0), Outcome(request_id=f"r{i}", status=200, latency_s=0.1)


async def test_a_batch_runs_when_full_when_old_enough_or_when_drained() -> None:
    seen: list[int] = []
    batch = OutcomeBatch(max_outcomes=3, max_delay_s=0.05)
    batch.steps.append(lambda items: seen.append(len(items)))
    for i in range(4):
        batch.add(*_pair(i))
    assert seen == [3] and len(batch) == 1  # full: at once
    await asyncio.sleep(0.1)
    assert seen == [3, 1]  # the rest within max_delay_s
    batch.add(*_pair(9))
    batch.drain()
    assert seen == [3, 1, 1] and len(batch) == 0
    assert batch.outcomes == 5 and batch.max_size == 3 and batch.max_age_s < 0.5


def test_length_evidence_of_a_batch_equals_one_answer_at_a_time() -> None:
    from guards.truncation import TruncationGuard

    key = ("up", "m", "code", 0.7, 1024)
    one, many = TruncationGuard(0.05), TruncationGuard(0.05)
    for guard in (one, many):
        for lower in (128, 256, 512):
            guard.admits(key, lower)  # tracked from the first ask
    rng = np.random.default_rng(5)
    answers = [(int(rng.choice([256, 1024])), int(rng.integers(20, 1100)), bool(rng.random() < 0.2)) for _ in range(300)]
    for sent, tokens, cut in answers:
        one.observe(key, sent, tokens, cut)
    for start in range(0, len(answers), 41):
        chunk = answers[start : start + 41]
        many.observe_many(key, [a[0] for a in chunk], [a[1] for a in chunk], [a[2] for a in chunk])
    assert one.evidence(key) == many.evidence(key)
