"""A second simulated LLM, built unlike `proxy/demo/simulator.py`, and a loop that runs the real decider on it.

Why a second one: a policy tuned against one simulator can look good because it matches
that simulator's shape. This one differs where the safe-learning issue says it matters:

* **hotter answers run longer**: natural length = median · exp(σ z) · (1 + `heat_length` · t),
  so tokens and latency grow with temperature, and a reward that cannot see quality
  drifts to cold arms;
* **quality over temperature is asymmetric**: a plateau of width `flat` around t*, then a
  linear fall, twice as steep on the hot side (simulator 1 uses a symmetric Gaussian bump);
* a truncated answer keeps a fixed share `cut_keep` of its quality (not m/n);
* **tasks whose client settings are already optimal** (`classify`, client t = 0 with a
  max_tokens cap; `chat`, no temperature sent, provider default 1.0 = t*), next to tasks
  where tuning helps (`creative`, `extract`);
* **a mid-run model change under the same name**: from request `change_at` on, every
  task's t* and length median move (`Task.after`), so statistics learnt before are stale.

The loop (`run`) uses the real `BanditDecider` (trust region, holdout, `tune_temperature`,
the client's max_tokens as a cap, budget guard over the in-process store), the real
`auto_quality`, reward and `policy.correct()`; only the wire and the clock are replaced.
A later signal (explicit, judge, regeneration mark) re-enters as the proxy does it:
`correct()` replaces the automatic reward and the task's signal count grows.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from guards.budget import BudgetGuard
from guards.conservative import ConservativeMonitor, ConservativeSettings
from guards.rollout import RolloutController
from guards.settings import BaselineSettings, CawsSettings, ConstraintsSettings, RolloutSettings, SloSettings
from guards.slo import SloMonitor
from guards.state import InProcessStore
from guards.trust_region import ModelLimits
from policies.base import Adaptive, Policy
from policies.quality import auto_quality
from policies.records import Outcome, Params, RequestContext
from policies.settings import ArmGridSettings, QualitySettings, RewardSettings
from policies.signals import judge_quality
from proxy.decision.decider import ArmSettings, ArmSpace, BanditDecider, DeciderSettings, DecisionGuards, tuned_params

PROVIDER_DEFAULT_TEMPERATURE = 1.0
"""What the upstream does with an omitted temperature (OpenAI's default)."""
MODEL_MAX_TOKENS = 4096
"""What the upstream does with an omitted max_tokens: no cap below this."""
Source = Literal["none", "explicit", "judge", "regeneration"]
_Z = np.linspace(-3.0, 3.0, 49)
_W = np.exp(-0.5 * _Z**2) / np.exp(-0.5 * _Z**2).sum()  # a discretised N(0, 1): expectations without sampling noise


@dataclass(frozen=True)
class Regime:
    """One task's hidden truth under one model."""

    best_temperature: float
    length_median: float


@dataclass(frozen=True)
class Task:
    """A task type: its truth before and after the model change, and what the client sends."""

    before: Regime
    after: Regime
    client_temperature: float | None  # None: the SDK sends none (provider default)
    client_max_tokens: int | None  # None: no cap sent
    prompt_tokens: int
    share: float
    peak: float = 0.9
    flat: float = 0.1
    slope: float = 0.5  # quality lost per unit of temperature below t* beyond the plateau (x2 above)
    length_sigma: float = 0.4
    quality_noise: float = 0.1


TASKS: dict[str, Task] = {
    # client already optimal: greedy classification with a tight cap
    "classify": Task(Regime(0.0, 12), Regime(0.0, 16), 0.0, 50, 400, 0.25, peak=0.95),
    # client already optimal: no temperature sent, the provider default is t*
    "chat": Task(Regime(1.0, 220), Regime(0.9, 300), None, None, 300, 0.3),
    # tuning helps: the client runs too cold (and the model change moves t* down)
    "creative": Task(Regime(1.2, 500), Regime(0.9, 650), 0.7, 1200, 150, 0.2, slope=0.8),
    # tuning helps: the client runs too hot for structured output
    "extract": Task(Regime(0.1, 120), Regime(0.3, 180), 0.6, 400, 1200, 0.25),
}


@dataclass(frozen=True)
class World:
    """The hidden truth (module docstring); pure functions of (task, arm, regime, draws)."""

    tasks: dict[str, Task] = field(default_factory=lambda: dict(TASKS))
    heat_length: float = 0.6
    cut_keep: float = 0.35
    ttft_s: float = 0.3
    per_token_s: float = 0.012

    def regime(self, task: str, changed: bool) -> Regime:
        t = self.tasks[task]
        return t.after if changed else t.before

    def quality_at(self, task: str, temperature: float, changed: bool) -> float:
        """Mean quality of an uncut answer at `temperature`."""
        t = self.tasks[task]
        d = temperature - self.regime(task, changed).best_temperature
        excess = max(0.0, abs(d) - t.flat) * (2.0 if d > 0 else 1.0)
        return max(0.05, t.peak - t.slope * excess)

    def natural_length(self, task: str, temperature: float, z: float, changed: bool) -> float:
        t = self.tasks[task]
        return max(1.0, self.regime(task, changed).length_median * math.exp(t.length_sigma * z) * (1.0 + self.heat_length * temperature))

    def respond(self, task: str, temperature: float, max_tokens: int, z: float, changed: bool) -> tuple[float, int, bool, float]:
        """(true quality, completion tokens, truncated, latency_s) for one prompt (length score z)."""
        n = self.natural_length(task, temperature, z, changed)
        cut = max_tokens < n
        tokens = int(min(max_tokens, round(n)))
        q = self.quality_at(task, temperature, changed) * (self.cut_keep if cut else 1.0)
        return q, tokens, cut, self.ttft_s + self.per_token_s * tokens

    def expected(self, task: str, temperature: float, max_tokens: int, changed: bool) -> tuple[float, float, float]:
        """(E[true quality], E[tokens], E[latency_s]) over the prompt's length score."""
        q = tok = lat = 0.0
        for z, w in zip(_Z, _W):
            qi, ti, _, li = self.respond(task, temperature, max_tokens, float(z), changed)
            q, tok, lat = q + w * qi, tok + w * ti, lat + w * li
        return q, tok, lat


def wire_arm(sent: Params) -> tuple[float, int]:
    """What the upstream actually runs: omitted knobs take the provider's defaults."""
    t = PROVIDER_DEFAULT_TEMPERATURE if sent.temperature is None else float(sent.temperature)
    return t, MODEL_MAX_TOKENS if sent.max_tokens is None else int(sent.max_tokens)


def client_arm(task: Task) -> tuple[float, int]:
    return wire_arm(Params(temperature=task.client_temperature, max_tokens=task.client_max_tokens))


def make_decider(policy: Policy, *, holdout: float = 0.05, tune: str = "auto", min_signals: int = 50, seed: int = 0) -> BanditDecider:
    """The real decider with the shipped defaults (general phase; the budget never binds here)."""
    slo = SloMonitor(SloSettings())
    rollout = RolloutController.create(RolloutSettings(), SloSettings(), slo, now=0.0, phase="general")
    return BanditDecider(
        policy=policy,
        arms=ArmSpace(
            ArmSettings(ConstraintsSettings(), ArmGridSettings(), tune, min_signals),  # type: ignore[arg-type]
            baseline_for=lambda task: BaselineSettings(), limits_for=lambda upstream, model: ModelLimits(),
        ),
        guards=DecisionGuards(budget=BudgetGuard(CawsSettings(budget_limit=10**15), InProcessStore()), slo=slo),
        rollout=rollout,
        settings=DeciderSettings(reward=RewardSettings(), holdout_fraction=holdout),
        rng=np.random.default_rng([seed, 1]),
        clock=lambda: 1000.0,
    )


@dataclass
class JudgeModel:
    """A simulated judge: hidden quality + N(0, sd²), rounded onto the 1-10 scale, mapped as proxy/learning/judge.py does."""

    sample_rate: float
    sd: float = 0.1
    rubric_tokens: int = 180  # rubric, delimiters and instructions around the conversation
    reply_tokens: int = 30  # {"score": n, "reason": "..."}

    def score(self, true_quality: float, rng: np.random.Generator) -> float:
        raw = 1.0 + 9.0 * min(1.0, max(0.0, true_quality + self.sd * float(rng.standard_normal())))
        return judge_quality(float(round(raw)))

    def tokens(self, prompt_tokens: int, answer_tokens: int) -> int:
        return self.rubric_tokens + prompt_tokens + answer_tokens + self.reply_tokens


def regenerate_probability(true_quality: float) -> float:
    """The simulated user regenerates bad answers more often: 0.6 at quality 0, 0.02 at 0.9 and above."""
    return float(min(0.6, max(0.02, 0.6 * max(0.0, 1.0 - true_quality / 0.9) ** 1.5)))


@dataclass
class RunLog:
    """Per request (arrays of length n)."""

    task: np.ndarray  # index into names
    names: list[str]
    mode: list[str]
    true_quality: np.ndarray  # true quality of what was sent, expected over the task's answer lengths
    client_quality: np.ndarray  # the same for the client's own settings (the paired counterfactual)
    expected_reward: np.ndarray  # E[reward] of the sent arm (fixed normalisers: the client's arm)
    best_reward: np.ndarray  # E[reward] of the best arm of the full trust region
    sent_temperature: np.ndarray
    sent_max_tokens: np.ndarray
    judge_tokens: int = 0
    signals: int = 0
    changes: list[tuple[int, str]] = field(default_factory=list)  # (request, task) of each change_detected


def _ctx(name: str, task: Task, model: str) -> RequestContext:
    return RequestContext(name, model, "chat", task.prompt_tokens, 2, False, name == "extract", False,
                          task.client_temperature, task.client_max_tokens, "up")  # fmt: skip


def run(
    policy: Policy,
    *,
    n: int,
    seed: int,
    source: Source = "explicit",
    change_at: int | None = None,
    judge: JudgeModel | None = None,
    explicit_rate: float = 1.0,
    immediate: bool = False,
    world: World | None = None,
    decider_factory: Callable[[Policy], BanditDecider] | None = None,
    seconds_per_request: float = 1.0,
    reopen_on_change: bool = False,
) -> RunLog:
    """`n` requests through the real decider; the environment stream depends on `seed` only.

    Request i happens at simulated time i·`seconds_per_request`: a policy with a `[policy]
    half_life_s` is advanced to that time's discount epoch before deciding, as the runtime's
    ticker does. `reopen_on_change`: the runtime's conservative monitor runs on the outcomes
    and a `change_detected` reopens the task (`Adaptive.reopen`), as `Runtime.on_conservative_events` does.

    `immediate`: the signal is known when the response completes (feedback posted while it
    streamed, which the proxy applies at completion), so the policy's first update already
    carries it; any `Policy` works then, including the Vowpal Wabbit adapter (no `correct()`).
    """
    return asyncio.run(_run(policy, n=n, seed=seed, source=source, change_at=change_at, judge=judge,
                            explicit_rate=explicit_rate, immediate=immediate, world=world or World(), decider_factory=decider_factory,
                            seconds_per_request=seconds_per_request, reopen_on_change=reopen_on_change))  # fmt: skip


async def _run(
    policy: Policy, *, n: int, seed: int, source: Source, change_at: int | None, judge: JudgeModel | None,
    explicit_rate: float, immediate: bool, world: World, decider_factory: Callable[[Policy], BanditDecider] | None,
    seconds_per_request: float = 1.0, reopen_on_change: bool = False,
) -> RunLog:
    decider = decider_factory(policy) if decider_factory else make_decider(policy, seed=seed)
    names = list(world.tasks)
    shares = np.array([world.tasks[k].share for k in names])
    env = np.random.default_rng([seed, 0])
    task_idx = env.choice(len(names), size=n, p=shares / shares.sum())
    z = env.standard_normal((n, 2))  # length score, observation noise
    u = env.random((n, 2))  # feedback sampling, regeneration
    signal_rng = np.random.default_rng([seed, 2])  # the judge's own noise
    quality_settings, reward_settings = QualitySettings(), RewardSettings()
    log = RunLog(task_idx, names, [], np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
    # Expected rewards per (task, regime, arm), normalised by the client's own arm (what BaselineCosts converges to).
    cache: dict[tuple[str, bool, float, int], tuple[float, float]] = {}

    def value(name: str, changed: bool, t: float, m: int) -> tuple[float, float]:
        key = (name, changed, round(t, 3), m)
        if key not in cache:
            q, tok, lat = world.expected(name, t, m, changed)
            ct, cm = client_arm(world.tasks[name])
            _, btok, blat = world.expected(name, ct, cm, changed)
            r = reward_settings.w_quality * q - reward_settings.w_latency * lat / blat - reward_settings.w_tokens * tok / max(btok, 1.0)
            cache[key] = (q, r)
        return cache[key]

    full = make_decider(policy, tune="always", holdout=0.0)  # the full trust region, for the regret reference
    adaptive = policy if isinstance(policy, Adaptive) else None
    monitor = ConservativeMonitor(ConservativeSettings()) if reopen_on_change else None
    for i in range(n):
        if adaptive is not None and adaptive.discount.enabled:
            adaptive.advance(adaptive.discount.epoch_at(i * seconds_per_request))
        name = names[task_idx[i]]
        task = world.tasks[name]
        changed = change_at is not None and i >= change_at
        ctx = _ctx(name, task, "sim-2")
        decision = await decider.decide(ctx, request_id=f"r{i}", assignment_key=f"user-{i}")
        t, m = wire_arm(decision.sent)
        ct, cm = client_arm(task)
        q, tokens, cut, latency = world.respond(name, t, m, float(z[i, 0]), changed)
        auto = auto_quality(status=200, content="answer", finish_reason="length" if cut else "stop", json_mode=False, settings=quality_settings)
        signal: float | None = None
        if source == "explicit" and u[i, 0] < explicit_rate:
            signal = min(1.0, max(0.0, q + task.quality_noise * float(z[i, 1])))
        elif source == "judge" and judge is not None and u[i, 0] < judge.sample_rate:
            signal = judge.score(q, signal_rng)
            log.judge_tokens += judge.tokens(task.prompt_tokens, tokens)
        elif source == "regeneration" and u[i, 1] < regenerate_probability(q):
            signal = 0.0  # [feedback] regenerated_quality
        first = signal if immediate and signal is not None else auto
        reward = decider.score(decision, status=200, error_class=None, latency_s=latency, completion_tokens=tokens, quality=first)
        outcome = Outcome(request_id=decision.request_id, status=200, latency_s=latency, completion_tokens=tokens,
                          finish_reason="length" if cut else "stop", quality=first, reward=reward)  # fmt: skip
        await decider.observe(decision, outcome)
        if monitor is not None:
            for event in monitor.on_outcome(decision, outcome, i * seconds_per_request):
                if event.kind == "change_detected":
                    log.changes.append((i, event.task_type))
                    if adaptive is not None:
                        adaptive.reopen(event.task_type)
        if signal is not None and not immediate and reward is not None:
            # Arrives after completion: replaces the automatic reward through correct(), counted once (proxy/decision/feedback.py).
            new = decider.costs.reward(task_type=name, quality=signal, latency_s=latency, tokens=tokens, settings=reward_settings)
            arm, base = decision.sent.arm(decision.baseline), decision.baseline.arm()
            decider.policy.correct(ctx, base, arm, reward, new, logged_version=decision.policy_version)
        one_sided = source == "regeneration"  # proxy/decision/feedback.py ONE_SIDED: marks only failures
        if signal is not None and reward is not None and not one_sided:
            # Temperature-visible: also feeds the temperature-only statistics (BanditDecider.pmf), as feedback.py does.
            new_signal = reward if immediate else decider.costs.reward(task_type=name, quality=signal, latency_s=latency, tokens=tokens, settings=reward_settings)
            decider.learn_signal(ctx, decision.baseline, decision.sent, new_signal, None, logged_version=decision.policy_version)
        if signal is not None:
            if not one_sided:
                decider.signals.add(name)
            log.signals += 1
        ref, arms, _ = full.reference_for(ctx)
        log.mode.append(decision.mode)
        log.true_quality[i] = value(name, changed, t, m)[0]
        log.client_quality[i] = value(name, changed, ct, cm)[0]
        log.expected_reward[i] = value(name, changed, t, m)[1]
        log.best_reward[i] = max(value(name, changed, *wire_arm(tuned_params(a, ref)))[1] for a in arms)
        log.sent_temperature[i], log.sent_max_tokens[i] = t, m
    return log

