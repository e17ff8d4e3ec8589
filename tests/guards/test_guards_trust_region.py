"""Trust region: edges by hand, and the invariant "nothing outside the region leaves" by hypothesis."""

from __future__ import annotations

import asyncio
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guards.budget import BudgetGuard
from guards.settings import CawsSettings, ConstraintsSettings
from guards.state import InProcessStore
from guards.trust_region import FREE, Freedom, ModelLimits, allowed_arms, enforce, temperature_range, within
from policies.records import Arm

C = ConstraintsSettings()  # deltas 0.2 / 500, max_tokens 4096, temperature [0, 2]
L = ModelLimits()
BASE = Arm(0.7, 1000)


def test_exact_delta_edges_are_inside() -> None:
    assert within(Arm(0.9, 1500), BASE, C, L)
    assert within(Arm(0.5, 500), BASE, C, L)
    # grid arithmetic: 0.7 + 0.2 is 0.8999999999999999 or 0.9000000000000001 depending on order
    assert within(Arm(0.7 + 0.2, 1000), BASE, C, L)
    assert not within(Arm(0.91, 1000), BASE, C, L)
    assert not within(Arm(0.7, 1501), BASE, C, L)
    assert not within(Arm(0.7, 499), BASE, C, L)


def test_model_and_operator_limits() -> None:
    assert not within(Arm(0.1, 100), Arm(0.0, 100), C, ModelLimits(min_temperature=0.2))
    assert temperature_range(ConstraintsSettings(max_temperature=1.5), ModelLimits(max_temperature=1.0)) == (0.0, 1.0)
    assert not within(Arm(1.1, 100), Arm(1.0, 100), C, ModelLimits(max_temperature=1.0))
    fixed = ModelLimits(fixed_temperature=1.0)
    assert within(Arm(1.0, 900), Arm(1.0, 1000), C, fixed)
    assert not within(Arm(0.9, 1000), Arm(1.0, 1000), C, fixed)
    assert not within(Arm(0.7, 1200), BASE, C, ModelLimits(max_tokens=1100))
    assert within(Arm(0.7, 1100), BASE, C, ModelLimits(max_tokens=1100))
    assert not within(Arm(0.7, 4097), Arm(0.7, 4000), C, L)
    assert not within(Arm(0.7, 0), Arm(0.7, 100), C, L)


def test_garbage_policy_output_is_refused() -> None:
    for arm in (
        Arm(math.nan, 1000),
        Arm(math.inf, 1000),
        Arm(0.7, True),  # type: ignore[arg-type]
        Arm(0.7, 1000.0),  # type: ignore[arg-type]
        Arm("0.7", 1000),  # type: ignore[arg-type]
    ):
        assert not within(arm, BASE, C, L)
        assert enforce(arm, BASE, C, L) is BASE


def test_allowed_arms_keeps_baseline_dedupes_and_falls_back() -> None:
    cands = [Arm(0.5, 800), Arm(0.5, 800), Arm(1.5, 800), Arm(0.8, 1200)]
    assert allowed_arms(cands, BASE, C, L) == [Arm(0.5, 800), Arm(0.8, 1200), BASE]
    assert allowed_arms([BASE, Arm(0.6, 900)], BASE, C, L) == [BASE, Arm(0.6, 900)]
    assert allowed_arms([Arm(1.9, 10)], BASE, C, L) == [BASE]
    # An invalid baseline (model only takes 1.0) is not offered when something valid exists...
    fixed = ModelLimits(fixed_temperature=1.0)
    assert allowed_arms([Arm(0.8, 1000), Arm(0.9, 1000)], BASE, C, fixed) == [BASE]
    assert allowed_arms([Arm(0.8, 1000)], Arm(0.9, 1000), C, fixed) == [Arm(0.9, 1000)]
    assert allowed_arms([Arm(1.0, 1000)], Arm(0.9, 1000), C, fixed) == [Arm(1.0, 1000)]


# ---- the invariant --------------------------------------------------------------

EPS = 1e-9


def oracle(arm: Arm, base: Arm, c: ConstraintsSettings, lim: ModelLimits, free: Freedom = FREE) -> bool:
    """Region membership written independently of the module under test."""
    t, m = arm.temperature, arm.max_tokens
    if type(t) not in (int, float) or type(m) is not int or not math.isfinite(t):
        return False
    lo = max(c.min_temperature, lim.min_temperature)
    hi = min(c.max_temperature, lim.max_temperature)
    ok = lo - EPS <= t <= hi + EPS
    ok = ok and abs(t - base.temperature) <= (c.max_delta_temperature if free.temperature else 0.0) + EPS
    band = min(c.max_delta_max_tokens, math.floor(c.max_relative_delta_max_tokens * base.max_tokens)) if free.max_tokens else 0
    ok = ok and abs(m - base.max_tokens) <= band
    ok = ok and (free.max_tokens_cap is None or m <= free.max_tokens_cap)
    ok = ok and 1 <= m <= c.max_tokens and (lim.max_tokens is None or m <= lim.max_tokens)
    ok = ok and (lim.fixed_temperature is None or abs(t - lim.fixed_temperature) <= EPS)
    return ok


temps = st.one_of(
    st.floats(min_value=-1.0, max_value=3.0, allow_nan=False),
    st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0, 2.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
tokens = st.one_of(st.integers(min_value=-10, max_value=10_000), st.sampled_from([1, 500, 1000, 1500, 4096]))
any_arm = st.builds(Arm, temps, tokens)
baselines = st.builds(Arm, st.floats(min_value=0.0, max_value=2.0), st.integers(min_value=1, max_value=8192))
constraints = st.builds(
    ConstraintsSettings,
    max_delta_temperature=st.floats(min_value=0.0, max_value=1.0),
    max_delta_max_tokens=st.integers(min_value=0, max_value=2000),
    max_tokens=st.integers(min_value=1, max_value=8192),
    min_temperature=st.floats(min_value=0.0, max_value=1.0),
    max_temperature=st.floats(min_value=1.0, max_value=2.0),
    max_relative_delta_max_tokens=st.floats(min_value=0.0, max_value=1.0),
)
freedoms = st.builds(Freedom, st.booleans(), st.booleans(), st.one_of(st.none(), st.integers(min_value=1, max_value=8192)))
limits = st.builds(
    ModelLimits,
    min_temperature=st.floats(min_value=0.0, max_value=1.0),
    max_temperature=st.floats(min_value=1.0, max_value=2.0),
    fixed_temperature=st.one_of(st.none(), st.sampled_from([0.0, 1.0])),
    max_tokens=st.one_of(st.none(), st.integers(min_value=1, max_value=8192)),
)


def _near(base: Arm) -> st.SearchStrategy[Arm]:
    return st.builds(
        Arm,
        st.floats(min_value=base.temperature - 0.4, max_value=base.temperature + 0.4),
        st.integers(min_value=base.max_tokens - 800, max_value=base.max_tokens + 800),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), base=baselines, c=constraints, lim=limits, free=freedoms)
def test_nothing_outside_the_region_is_ever_allowed_or_sent(
    data: st.DataObject, base: Arm, c: ConstraintsSettings, lim: ModelLimits, free: Freedom
) -> None:
    cands = data.draw(st.lists(st.one_of(any_arm, _near(base)), max_size=30))
    arms = allowed_arms(cands, base, c, lim, free)
    assert arms
    for arm in arms:
        assert arm == base or oracle(arm, base, c, lim, free)
    # whatever the policy outputs: an index into the allowed list or an arbitrary arm
    policy_out = data.draw(st.one_of(st.none(), any_arm, _near(base), st.sampled_from(arms)))
    sent = enforce(policy_out, base, c, lim, free)
    assert sent == base or oracle(sent, base, c, lim, free)
    if policy_out is not None and oracle(policy_out, base, c, lim, free):
        assert sent == policy_out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    base=baselines,
    c=constraints,
    limit=st.integers(min_value=0, max_value=20_000),
    prefill=st.integers(min_value=0, max_value=25_000),
    on_exhausted=st.sampled_from(["baseline", "reject"]),
    confidence=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
)
def test_budget_never_sends_anything_outside_the_region(
    data: st.DataObject,
    base: Arm,
    c: ConstraintsSettings,
    limit: int,
    prefill: int,
    on_exhausted: str,
    confidence: float | None,
) -> None:
    cands = data.draw(st.lists(st.one_of(any_arm, _near(base)), max_size=20))
    arms = allowed_arms(cands, base, c, L)
    chosen = data.draw(st.one_of(st.none(), st.integers(min_value=0, max_value=len(arms) - 1)))
    guard = BudgetGuard(
        CawsSettings(budget_limit=limit, on_exhausted=on_exhausted, waiver_cache_s=0.0),  # type: ignore[arg-type]
        InProcessStore(),
    )

    async def go() -> None:
        now = 1_000_000.0
        await guard.decide(
            allowed=[base], chosen=None, baseline=Arm(base.temperature, prefill), task_type="t", prompt_tokens=0, confidence=None, now=now
        )
        verdict = await guard.decide(
            allowed=arms,
            chosen=chosen,
            baseline=base,
            task_type="t",
            prompt_tokens=data.draw(st.integers(0, 5000)),
            confidence=confidence,
            now=now,
        )
        assert verdict.arm in arms or verdict.arm == base
        assert enforce(verdict.arm, base, c, L) == verdict.arm or verdict.arm == base

    asyncio.run(go())
