"""The model as a knob (issue 28): declared stand-ins, the model stage of the draw, evidence before traffic.

Pure: hand-built contexts, limits and prices; the real arm space, sampler, plan and evidence.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guards.trust_region import ModelLimits
from policies import sequences
from policies.pricing import Price, Rates
from policies.records import Arm, Params, RequestContext
from policies.settings import ArmGridSettings
from policies.thompson import stat_key
from proxy.config import ConfigError, build_config, serving_upstream
from proxy.decision import BanditDecider, ModelEvidence, ModelStageSettings, declared_stand_ins
from tests.support.decider import build_decider

BIG, SMALL = "big", "small"
SUBS = {BIG: ((SMALL, "up2"),)}
EPS = 0.05


class Prices:
    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def rates(self, upstream: str, model: str) -> Rates | None:
        price = self.table.get(model)
        return None if price is None else Rates(input=Price(price), output=Price(4 * price))


def ctx(temperature: float | None = 0.7, max_tokens: int | None = 600, task: str = "code") -> RequestContext:
    return RequestContext(task, BIG, "chat", 100, 1, False, False, False, temperature, max_tokens, "up1")


def decider(small: ModelLimits | None = None, holdout: float = 0.0, phase: str = "general", cheaper: bool = True) -> BanditDecider:
    return build_decider(
        grid=ArmGridSettings(temperature_steps=3, max_tokens_steps=3), tune="always", holdout=holdout, phase=phase,
        substitutes=SUBS, limits_by_model={SMALL: small or ModelLimits()},
        prices=Prices({BIG: 10.0, SMALL: 1.0 if cheaper else 20.0}), models=ModelStageSettings(exploration_share=EPS),
    )


def upstreams(*extra: dict[str, object]) -> list[dict[str, object]]:
    big = {"name": "a", "base_url": "http://a/v1", "models": ["big*"], "models_config": [{"pattern": "big*", "substitutes": ["small"]}]}
    return [big, *extra]


def test_a_stand_in_must_be_served_by_an_upstream_of_the_same_wire_format() -> None:
    cfg = build_config({"upstreams": upstreams({"name": "b", "base_url": "http://b/v1", "models": ["small"]})}, environ={})
    assert declared_stand_ins(cfg.upstreams, "a", "big-1") == (("small", "b"),)
    assert declared_stand_ins(cfg.upstreams, "a", "other") == ()  # undeclared: never substituted
    assert serving_upstream(cfg.upstreams, "small", "anthropic") is None
    with pytest.raises(ConfigError, match="substitutes"):
        build_config({"upstreams": upstreams()}, environ={})  # nobody serves "small"
    with pytest.raises(ConfigError, match="substitutes"):
        build_config({"upstreams": upstreams({"name": "b", "base_url": "http://b/v1", "models": ["small"], "format": "anthropic"})}, environ={})


def test_the_stand_in_s_own_limits_apply() -> None:
    options = decider(ModelLimits(max_temperature=0.8, max_tokens=4096)).arms.options(ctx())
    small = [a for a in options.allowed if a.model == SMALL]
    assert small and options.allowed[0].model is None  # the requested model's arms first
    assert max(a.temperature for a in small) <= 0.8 and options.stand_ins[SMALL].upstream == "up2"
    assert options.stand_ins[SMALL].reference.sent == Params(temperature=0.7, max_tokens=600, model=SMALL)
    # a temperature the stand-in refuses, a cap above its limit, an effort it does not list: not offered
    assert not decider(ModelLimits(accepts_temperature=False)).arms.options(ctx()).stand_ins
    assert not decider(ModelLimits(max_tokens=500)).arms.options(ctx()).stand_ins
    assert decider(ModelLimits(accepts_temperature=False)).arms.options(ctx(temperature=None)).stand_ins


def test_propensities_are_exact_products_with_the_model_first() -> None:
    d = decider()
    c = ctx()
    options = d.arms.options(c)
    pmf = d.pmf(c, options.reference.arm, options.allowed)
    assert pmf.sum() == pytest.approx(1.0)
    small = np.array([a.model == SMALL for a in options.allowed])
    assert pmf[small].sum() == pytest.approx(EPS)  # exploring: exactly its exploration share
    rng = np.random.default_rng(1)
    for _ in range(200):
        choice = d.choose(c, options.reference.arm, options.allowed, rng)
        assert choice.propensity == pytest.approx(pmf[choice.index])


def test_the_holdout_and_unoptimised_traffic_always_get_the_requested_model() -> None:
    async def sent(d: BanditDecider, n: int) -> list[tuple[str, str | None]]:
        out = []
        for i in range(n):
            decision = await d.decide(ctx(), request_id=f"r{i}", assignment_key=f"k{i}")
            out.append((decision.mode, decision.sent.model))
        return out

    tuned = asyncio.run(sent(decider(holdout=0.3), 400))
    assert {m for mode, m in tuned if mode == "holdout"} == {None}
    assert SMALL in {m for mode, m in tuned if mode == "optimized"}
    assert {m for _, m in asyncio.run(sent(decider(phase="shadow"), 100))} == {None}


def test_a_stand_in_decision_names_its_model_and_upstream() -> None:
    d = decider()

    async def first_stand_in() -> None:
        for i in range(400):
            decision = await d.decide(ctx(), request_id=f"r{i}", assignment_key=f"k{i}")
            if decision.sent.model == SMALL:
                assert decision.served_by == ("up2", SMALL)
                assert decision.policy_choice is not None and decision.policy_choice.model == SMALL
                assert decision.sent.render().startswith("model=small; ")
                return
        raise AssertionError("no stand-in drawn")

    asyncio.run(first_stand_in())


def feed(ev: ModelEvidence, model: str | None, qualities: np.ndarray) -> None:
    for q in qualities:
        ev.observe("code", model, "judge", float(q))


def test_a_stand_in_as_good_is_proven_then_preferred_when_cheaper() -> None:
    d = decider()
    rng = np.random.default_rng(0)
    feed(d.models, None, np.clip(rng.normal(0.8, 0.05, 600), 0, 1))
    feed(d.models, SMALL, np.clip(rng.normal(0.8, 0.05, 600), 0, 1))
    assert d.models.status("code", SMALL) == "proven"
    c = ctx()
    options = d.arms.options(c)
    pmf = d.pmf(c, options.reference.arm, options.allowed)
    big = np.array([a.model is None for a in options.allowed])
    assert pmf[big].sum() == pytest.approx(EPS)  # the requested model is only explored now
    dear = decider(cheaper=False)
    feed(dear.models, None, np.full(600, 0.8))
    feed(dear.models, SMALL, np.full(600, 0.8))
    pmf = dear.pmf(c, options.reference.arm, options.allowed)
    assert pmf[big].sum() == pytest.approx(0.5)  # proven but not cheaper: the policy's split (uniform here)


def test_a_worse_stand_in_is_kept_off_and_an_untrusted_judge_proves_nothing() -> None:
    d = decider()
    rng = np.random.default_rng(0)
    feed(d.models, None, np.clip(rng.normal(0.8, 0.05, 400), 0, 1))
    for q in np.full(400, 0.8):
        d.models.observe("code", SMALL, "judge", float(q), trusted=False)
    assert d.models.status("code", SMALL) == "exploring"
    feed(d.models, SMALL, np.clip(rng.normal(0.5, 0.05, 400), 0, 1))
    assert d.models.status("code", SMALL) == "worse"
    assert not d.arms.options(ctx()).stand_ins
    assert d.arms.options(ctx(task="other")).stand_ins  # per task type


def test_non_inferiority_mirrors_the_worse_verdict() -> None:
    c = sequences.new_comparison(0.05)
    assert not sequences.non_inferior(c)
    for _ in range(500):
        c = sequences.observe_holdout(sequences.observe_optimised(c, 0.8), 0.8)
    assert sequences.non_inferior(c, 0.05) and sequences.verdict(c, 0.05) == "unknown"


def test_signals_teach_the_model_stage_under_the_stand_in_s_own_keys() -> None:
    assert stat_key("b", Arm(0.7, 600)) == "b|T0.7|M600"  # the requested model's keys are as before
    assert stat_key("b", Arm(0.7, 600, model=SMALL)) == "b|T0.7|M600#small"
    d = decider()
    seen: list[tuple[str, Arm]] = []
    d.policy.update = lambda c, base, arm, r: seen.append((c.task_type, arm))  # type: ignore[method-assign]
    base = Params(temperature=0.7, max_tokens=600)
    d.learn_signal(ctx(), base, Params(temperature=0.7, max_tokens=600, model=SMALL), 0.5, None, logged_version="v")
    assert ("code~temperature", Arm(0.7, 600, model=SMALL)) in seen and ("code~model", Arm(0.7, 600, model=SMALL)) in seen


def test_under_a_dollar_budget_a_cheaper_stand_in_is_the_cheaper_arm_at_the_waiver_threshold() -> None:
    from guards.budget import BudgetGuard
    from guards.settings import CawsSettings
    from guards.state import InProcessStore

    guard = BudgetGuard(CawsSettings(unit="usd", budget_limit=1.0, waiver_threshold=0.5), InProcessStore())
    big, small = Rates(input=Price(10.0), output=Price(40.0)), Rates(input=Price(1.0), output=Price(4.0))
    base = Arm(0.7, 600)
    allowed = [base, Arm(0.7, 900), Arm(0.7, 600, model=SMALL), Arm(0.7, 900, model=SMALL)]

    async def run() -> tuple[str, Arm]:
        # fill past the waiver threshold with the baseline's own traffic
        while not (await guard.decide(allowed=[base], chosen=None, baseline=base, task_type="t", prompt_tokens=100, confidence=None,
                                      now=10.0, rates=big)).waiver_zone:
            pass
        v = await guard.decide(allowed=allowed, chosen=1, baseline=base, task_type="t", prompt_tokens=100, confidence=0.99, now=10.0,
                               rates=big, model_rates={SMALL: small})
        return v.reason, v.arm

    reason, arm = asyncio.run(run())
    assert reason == "cheaper_fit" and arm == Arm(0.7, 600, model=SMALL)  # not the baseline: the stand-in costs less


def test_the_pairwise_judge_s_baseline_answer_comes_from_the_requested_model() -> None:
    from proxy.edge import CHAT
    from proxy.learning import BaselineRequest

    d = decider()
    make = BaselineRequest(d, CHAT.patch)
    c = ctx()

    async def stand_in_decision() -> object:
        for i in range(400):
            decision = await d.decide(c, request_id=f"r{i}", assignment_key=f"k{i}")
            if decision.sent.model == SMALL:
                return decision
        raise AssertionError("no stand-in drawn")

    decision = asyncio.run(stand_in_decision())
    sent_body = {"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "max_tokens": 600}
    body = make(decision, sent_body)  # type: ignore[arg-type]
    assert body is not None and body["model"] == BIG and body["temperature"] == 0.7 and body["max_tokens"] == 600


def test_thompson_plays_the_pmf_it_logs_with_stand_ins_and_temperatures() -> None:
    from policies.thompson import ThompsonGaussianPolicy

    d = build_decider(
        ThompsonGaussianPolicy(), grid=ArmGridSettings(temperature_steps=3, max_tokens_steps=3), tune="always",
        substitutes=SUBS, prices=Prices({BIG: 10.0, SMALL: 1.0}), models=ModelStageSettings(exploration_share=EPS),
    )
    c = ctx()
    options = d.arms.options(c)
    rng = np.random.default_rng(2)
    for arm in options.allowed:  # some statistics, so the tables are not uniform
        d.policy.update(c, options.reference.arm, arm, float(rng.normal(0.5, 0.1)))
        d.learn_signal(c, Params(0.7, 600), Params(arm.temperature, arm.max_tokens, model=arm.model), float(rng.normal(0.5, 0.1)), None,
                       logged_version=d.policy.version)
    pmf = d.pmf(c, options.reference.arm, options.allowed)
    assert pmf.sum() == pytest.approx(1.0) and (pmf > 0).all()
    assert pmf[[a.model == SMALL for a in options.allowed]].sum() == pytest.approx(EPS)
    for _ in range(300):
        choice = d.choose(c, options.reference.arm, options.allowed, rng)
        assert choice.propensity == pytest.approx(pmf[choice.index], rel=1e-9)
