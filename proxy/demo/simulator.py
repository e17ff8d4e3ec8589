"""A stand-in LLM with a known ground truth, for tests, the demo and the benchmarks.

Pure: no I/O, no clock; randomness comes from Generators seeded by the caller.
`proxy/demo/simulator_server.py` wraps it in an OpenAI-compatible HTTP server; `simulate`
runs a policy against it in-process (the learning tests and `bench/learning`).

Ground truth per task type (`TaskProfile`):

* Quality over temperature is a bump: q(t) = floor + (peak − floor)·exp(−½((t − t*)/width)²),
  with t* = 0.2 for code, 1.0 for creative, 0.5 for summarise, 0.7 for default.
  The observed quality is clip(q + N(0, quality_noise²), 0, 1).
* Every prompt has a natural answer length n (log-normal around `length_median`; in the
  server it is a deterministic function of the prompt text, so the same prompt always
  wants the same length).  If max_tokens m < n the answer is cut: m tokens,
  finish_reason "length", and quality × truncation_keep × m/n.
* Latency = (ttft + per_token_s · tokens) · ν with ttft = ttft_base_s + ttft_per_prompt_token_s
  · prompt_tokens and ν a mean-one log-normal noise (σ = latency_noise); TTFT = ttft · ν.
* Reasoning effort (`Arm.effort`, absent = "medium"): each step up the effort scale
  multiplies the natural length by `effort_token_growth` (reasoning tokens are output
  tokens, so latency grows with them) and adds effort_gain·2^−r to q, r the level's rank
  (none = 0): hard tasks (large effort_gain) gain most, each step half as much as the
  last, and an answer cut by max_tokens loses what the effort bought.

* Models (`ModelProfile`, by the request's `model`): a model adds its own `quality_shift[task]`
  to q (the model as a knob, issue 28). By default "sim-1" is the reference and "sim-1-mini",
  priced at a tenth, is as good on summarise and default and clearly worse on code (−0.35)
  and creative (−0.25); an unknown model behaves like the reference.

`expected_reward` integrates all of that exactly (quantile grid over n, closed-form mean
of the clipped normal), so `optimum` gives the true best arm and regret can be computed
without sampling noise.  Rewards use fixed normalisers: the expected latency and tokens
of the task's baseline arm (what `policies.reward.BaselineCosts` converges to).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import msgspec
import numpy as np

from policies.arms import candidate_arms
from policies.base import Policy
from policies.effort import EFFORT_LEVELS, rank
from policies.records import Arm, RequestContext
from policies.reward import compute_reward
from policies.settings import ArmGridSettings, RewardSettings

QUANTILE_POINTS = 512
_STD_NORMAL = NormalDist()
_Z_GRID = np.array([_STD_NORMAL.inv_cdf((i + 0.5) / QUANTILE_POINTS) for i in range(QUANTILE_POINTS)])
_erf = np.frompyfunc(math.erf, 1, 1)


class TaskProfile(msgspec.Struct, frozen=True):
    """Ground truth of one task type (module docstring) and its share of simulated traffic."""

    best_temperature: float
    length_median: float
    prompt_median: float
    share: float = 0.25
    peak_quality: float = 0.92
    floor_quality: float = 0.2
    width: float = 0.45
    quality_noise: float = 0.08
    length_sigma: float = 0.35
    prompt_sigma: float = 0.6
    client_temperature: float = 0.7
    client_max_tokens: int = 512
    effort_gain: float = 0.05  # quality reasoning can add from none to unbounded effort (hard tasks: more)


DEFAULT_TASKS: dict[str, TaskProfile] = {
    "code": TaskProfile(best_temperature=0.2, length_median=350, prompt_median=900, share=0.3, effort_gain=0.16),
    "creative": TaskProfile(best_temperature=1.0, length_median=600, prompt_median=120, share=0.2, effort_gain=0.0),
    "summarise": TaskProfile(best_temperature=0.5, length_median=180, prompt_median=3000, share=0.25, effort_gain=0.02),
    "default": TaskProfile(best_temperature=0.7, length_median=260, prompt_median=300, share=0.25),
}
BASE_EFFORT = "medium"  # what a request without an effort gets: the profiles above are measured there


class ModelProfile(msgspec.Struct, frozen=True):
    """One simulated model: its quality relative to the reference per task, and its price (US dollars per million tokens)."""

    quality_shift: dict[str, float] = msgspec.field(default_factory=dict)
    input_price_per_mtok: float = 2.0
    output_price_per_mtok: float = 8.0


DEFAULT_MODEL_PROFILES: dict[str, ModelProfile] = {
    "sim-1": ModelProfile(),
    "sim-1-mini": ModelProfile(quality_shift={"code": -0.35, "creative": -0.25}, input_price_per_mtok=0.2, output_price_per_mtok=0.8),
}


class SimulatorTruth(msgspec.Struct, frozen=True):
    """The whole ground truth: task profiles and the latency model."""

    tasks: dict[str, TaskProfile] = msgspec.field(default_factory=lambda: dict(DEFAULT_TASKS))
    models: dict[str, ModelProfile] = msgspec.field(default_factory=lambda: dict(DEFAULT_MODEL_PROFILES))
    ttft_base_s: float = 0.15
    ttft_per_prompt_token_s: float = 0.00005
    per_token_s: float = 0.01
    latency_noise: float = 0.1
    truncation_keep: float = 0.6
    effort_token_growth: float = 1.3

    def profile(self, task_type: str) -> TaskProfile:
        """The task's profile; unknown task types behave like "default"."""
        return self.tasks.get(task_type) or self.tasks.get("default") or next(iter(self.tasks.values()))

    def mean_quality(self, task_type: str, temperature: float) -> float:
        """q(t) before truncation and noise."""
        p = self.profile(task_type)
        bump = math.exp(-0.5 * ((temperature - p.best_temperature) / p.width) ** 2)
        return p.floor_quality + (p.peak_quality - p.floor_quality) * bump

    def model_shift(self, task_type: str, model: str | None) -> float:
        """Quality `model` adds (or loses) on the task against the reference model (0 for an unknown model)."""
        profile = self.models.get(model) if model is not None else None
        if profile is None:
            return 0.0
        return profile.quality_shift.get(task_type if task_type in self.tasks else "default", 0.0)  # an unknown task is "default"

    def effort_steps(self, effort: str | None) -> int:
        """Signed steps from the base effort (0 when absent); ValueError for an unknown level."""
        return 0 if effort is None else rank(effort, EFFORT_LEVELS) - rank(BASE_EFFORT, EFFORT_LEVELS)

    def effort_quality(self, task_type: str, effort: str | None) -> float:
        """Quality added (or lost, below the base) by `effort`: effort_gain·(2^−r(base) − 2^−r)."""
        base = rank(BASE_EFFORT, EFFORT_LEVELS)
        r = base + self.effort_steps(effort)
        return self.profile(task_type).effort_gain * (2.0**-base - 2.0**-r)

    def effort_length(self, natural_tokens: float, effort: str | None) -> int:
        """Output tokens a prompt wants at `effort` (its answer plus the reasoning)."""
        return max(1, round(natural_tokens * self.effort_token_growth ** self.effort_steps(effort)))

    def natural_length(self, task_type: str, z: float) -> int:
        """Natural answer length for a standard-normal score z of the prompt."""
        p = self.profile(task_type)
        return max(1, round(p.length_median * math.exp(p.length_sigma * z)))

    def prompt_tokens(self, task_type: str, z: float) -> int:
        """Prompt length for a standard-normal score z (in-process workload)."""
        p = self.profile(task_type)
        return max(1, round(p.prompt_median * math.exp(p.prompt_sigma * z)))

    def ttft_mean_s(self, prompt_tokens: float) -> float:
        """Expected time to first token for a prompt of `prompt_tokens`."""
        return self.ttft_base_s + self.ttft_per_prompt_token_s * prompt_tokens

    def mean_prompt_tokens(self, task_type: str) -> float:
        """E[prompt tokens] of the task's log-normal prompt distribution."""
        p = self.profile(task_type)
        return p.prompt_median * math.exp(0.5 * p.prompt_sigma**2)

    def respond(
        self,
        task_type: str,
        arm: Arm,
        *,
        natural_tokens: int,
        prompt_tokens: int,
        quality_z: float,
        latency_z: float,
    ) -> SimOutcome:
        """Outcome of one request given its pre-drawn randomness (standard-normal scores);
        `natural_tokens` is the length at the base effort, `arm.effort` stretches it, `arm.model` shifts quality."""
        p = self.profile(task_type)
        natural_tokens = self.effort_length(natural_tokens, arm.effort)
        truncated = arm.max_tokens < natural_tokens
        tokens = min(arm.max_tokens, natural_tokens)
        q = self.arm_quality(task_type, arm)
        if truncated:
            q *= self.truncation_keep * arm.max_tokens / natural_tokens
        quality = min(1.0, max(0.0, q + p.quality_noise * quality_z))
        nu = math.exp(self.latency_noise * latency_z - 0.5 * self.latency_noise**2)
        ttft = self.ttft_mean_s(prompt_tokens) * nu
        latency = ttft + self.per_token_s * tokens * nu
        return SimOutcome(
            quality=quality,
            true_quality=q,
            completion_tokens=tokens,
            finish_reason="length" if truncated else "stop",
            latency_s=latency,
            ttft_s=ttft,
        )

    # ------------------------------------------------------------ expectations
    def _length_grid(self, task_type: str) -> np.ndarray:
        p = self.profile(task_type)
        return np.maximum(1.0, np.round(p.length_median * np.exp(p.length_sigma * _Z_GRID)))

    def expected_outcome(self, task_type: str, arm: Arm) -> tuple[float, float, float]:
        """(E[observed quality], E[latency_s], E[completion tokens]) of an arm, exactly."""
        p = self.profile(task_type)
        n = np.maximum(1.0, np.round(self._length_grid(task_type) * self.effort_token_growth ** self.effort_steps(arm.effort)))
        tokens = np.minimum(float(arm.max_tokens), n)
        q0 = self.arm_quality(task_type, arm)
        q = q0 * np.where(arm.max_tokens < n, self.truncation_keep * arm.max_tokens / n, 1.0)
        quality = float(np.mean(_clipped_normal_mean(q, p.quality_noise)))
        mean_tokens = float(np.mean(tokens))
        latency = self.ttft_mean_s(self.mean_prompt_tokens(task_type)) + self.per_token_s * mean_tokens
        return quality, latency, mean_tokens

    def arm_quality(self, task_type: str, arm: Arm) -> float:
        """q of an uncut answer: temperature bump, effort and model, clipped to [0, 1]."""
        q = self.mean_quality(task_type, arm.temperature) + self.effort_quality(task_type, arm.effort) + self.model_shift(task_type, arm.model)
        return min(1.0, max(0.0, q))

    def normalisers(self, task_type: str, baseline: Arm) -> tuple[float, float]:
        """(baseline latency, baseline tokens): expected costs of the baseline arm."""
        _, latency, tokens = self.expected_outcome(task_type, baseline)
        return latency, tokens

    def expected_reward(self, task_type: str, baseline: Arm, arm: Arm, settings: RewardSettings) -> float:
        """E[reward] of `arm` for the task, normalised by the baseline arm's expected costs.

        Exact for the linear reward; the max_ratio cap is ignored (it does not bind
        at the default noise levels).
        """
        base_latency, base_tokens = self.normalisers(task_type, baseline)
        quality, latency, tokens = self.expected_outcome(task_type, arm)
        return settings.w_quality * quality - settings.w_latency * latency / base_latency - settings.w_tokens * tokens / base_tokens

    def optimum(self, task_type: str, baseline: Arm, arms: Sequence[Arm], settings: RewardSettings | None = None) -> tuple[int, float]:
        """(index, expected reward) of the best arm among `arms`: the regret reference."""
        settings = settings or RewardSettings()
        values = [self.expected_reward(task_type, baseline, arm, settings) for arm in arms]
        best = int(np.argmax(values))
        return best, values[best]

    def describe(self, baseline: Arm, arms: Sequence[Arm], settings: RewardSettings | None = None) -> dict:
        """JSON-able ground truth (the server's `/sim/truth`)."""
        settings = settings or RewardSettings()
        out: dict = {"truth": msgspec.to_builtins(self), "tasks": {}}
        for task in self.tasks:
            values = [self.expected_reward(task, baseline, arm, settings) for arm in arms]
            best = int(np.argmax(values))
            out["tasks"][task] = {
                "best_temperature_unconstrained": self.profile(task).best_temperature,
                "optimum_arm": msgspec.to_builtins(arms[best]),
                "optimum_reward": values[best],
                "baseline_reward": self.expected_reward(task, baseline, baseline, settings),
                "arms": [{"temperature": a.temperature, "max_tokens": a.max_tokens, "expected_reward": v} for a, v in zip(arms, values)],
            }
        return out


class SimOutcome(msgspec.Struct, frozen=True):
    """One simulated response."""

    quality: float  # observed (noisy) quality in [0, 1]
    true_quality: float  # expected quality for this prompt and arm
    completion_tokens: int
    finish_reason: str
    latency_s: float
    ttft_s: float


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    scaled = np.atleast_1d(np.asarray(x, dtype=np.float64)) / math.sqrt(2.0)
    return 0.5 * (1.0 + np.asarray(_erf(scaled), dtype=np.float64))


def _clipped_normal_mean(mu: np.ndarray, sigma: float) -> np.ndarray:
    """E[clip(N(mu, sigma²), 0, 1)] = E[max(X, 0)] − E[max(X − 1, 0)]."""
    mu = np.asarray(mu, dtype=np.float64)
    if sigma <= 0:
        return np.clip(mu, 0.0, 1.0)

    def positive_part(c: float) -> np.ndarray:
        d = (mu - c) / sigma
        return (mu - c) * _norm_cdf(d) + sigma * np.exp(-0.5 * d * d) / math.sqrt(2.0 * math.pi)

    return positive_part(0.0) - positive_part(1.0)


# ---------------------------------------------------------------- in-process run
@dataclass
class SimulationLog:
    """Per-request record of a simulated run (arrays of length n_requests)."""

    task_names: list[str]
    task: np.ndarray  # index into task_names
    chosen: np.ndarray  # arm index among that request's arms
    propensity: np.ndarray
    reward: np.ndarray  # realised reward
    expected: np.ndarray  # ground-truth expected reward of the chosen arm
    optimum: np.ndarray  # ground-truth expected reward of the best allowed arm
    baseline: np.ndarray  # ground-truth expected reward of the baseline arm
    arms: list[list[Arm]] = field(default_factory=list)  # distinct arm lists, by `arm_set`
    arm_set: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))

    def cumulative_regret(self) -> np.ndarray:
        """Σ (optimum − expected) over requests: pseudo-regret, free of reward noise."""
        return np.cumsum(self.optimum - self.expected)

    def ratio_to_optimum(self, start: int, stop: int) -> dict[str, float]:
        """Per task: mean expected reward of the chosen arms / mean optimum, in [start, stop)."""
        out = {}
        window = slice(start, stop)
        for i, name in enumerate(self.task_names):
            mask = self.task[window] == i
            if mask.any():
                out[name] = float(self.expected[window][mask].mean() / self.optimum[window][mask].mean())
        return out

    def mean_by_task(self, values: np.ndarray, start: int, stop: int) -> dict[str, float]:
        """Per task mean of `values` (e.g. `expected`, `baseline`) in [start, stop)."""
        window = slice(start, stop)
        return {
            name: float(values[window][self.task[window] == i].mean())
            for i, name in enumerate(self.task_names)
            if (self.task[window] == i).any()
        }


def simulate(
    policy: Policy,
    *,
    n_requests: int,
    seed: int,
    truth: SimulatorTruth | None = None,
    reward_settings: RewardSettings | None = None,
    max_delta_temperature: float = 0.2,
    max_delta_max_tokens: int = 500,
    grid: ArmGridSettings | None = None,
    model: str = "sim-1",
) -> SimulationLog:
    """Run `policy` for `n_requests` simulated requests: choose, observe, reward, update.

    The environment stream (task, prompt length, natural length, noise) comes from
    `default_rng([seed, 0])` and is drawn up front, so every policy run with the same
    seed faces exactly the same requests; the policy's own randomness comes from
    `default_rng([seed, 1])`.
    """
    truth = truth or SimulatorTruth()
    settings = reward_settings or RewardSettings()
    grid = grid or ArmGridSettings()
    names = list(truth.tasks)
    shares = np.array([truth.tasks[name].share for name in names], dtype=np.float64)
    env = np.random.default_rng([seed, 0])
    task_idx = env.choice(len(names), size=n_requests, p=shares / shares.sum())
    z = env.standard_normal((n_requests, 4))  # prompt, natural length, quality, latency
    policy_rng = np.random.default_rng([seed, 1])

    arm_lists: list[list[Arm]] = []
    per_task: dict[str, tuple[Arm, list[Arm], int, np.ndarray, float, tuple[float, float]]] = {}
    for name in names:
        profile = truth.tasks[name]
        baseline = Arm(temperature=profile.client_temperature, max_tokens=profile.client_max_tokens)
        arms = candidate_arms(
            baseline,
            max_delta_temperature=max_delta_temperature,
            max_delta_max_tokens=max_delta_max_tokens,
            grid=grid,
        )
        values = np.array([truth.expected_reward(name, baseline, arm, settings) for arm in arms])
        base_value = truth.expected_reward(name, baseline, baseline, settings)
        arm_lists.append(arms)
        per_task[name] = (baseline, arms, len(arm_lists) - 1, values, base_value, truth.normalisers(name, baseline))

    log = SimulationLog(
        task_names=names,
        task=task_idx,
        chosen=np.zeros(n_requests, dtype=np.intp),
        propensity=np.zeros(n_requests),
        reward=np.zeros(n_requests),
        expected=np.zeros(n_requests),
        optimum=np.zeros(n_requests),
        baseline=np.zeros(n_requests),
        arms=arm_lists,
        arm_set=np.zeros(n_requests, dtype=np.intp),
    )
    for i in range(n_requests):
        name = names[task_idx[i]]
        baseline, arms, set_index, values, base_value, (base_latency, base_tokens) = per_task[name]
        prompt_tokens = truth.prompt_tokens(name, float(z[i, 0]))
        ctx = RequestContext(
            task_type=name,
            model=model,
            endpoint="chat",
            prompt_tokens_est=prompt_tokens,
            message_count=2,
            has_tools=False,
            json_mode=False,
            stream=False,
            client_temperature=baseline.temperature,
            client_max_tokens=baseline.max_tokens,
        )
        choice = policy.choose(ctx, baseline, arms, policy_rng)
        arm = arms[choice.index]
        outcome = truth.respond(
            name,
            arm,
            natural_tokens=truth.natural_length(name, float(z[i, 1])),
            prompt_tokens=prompt_tokens,
            quality_z=float(z[i, 2]),
            latency_z=float(z[i, 3]),
        )
        reward = compute_reward(
            quality=outcome.quality,
            latency_s=outcome.latency_s,
            tokens=outcome.completion_tokens,
            baseline_latency_s=base_latency,
            baseline_tokens=base_tokens,
            settings=settings,
        )
        policy.update(ctx, baseline, arm, reward)
        log.chosen[i] = choice.index
        log.propensity[i] = choice.propensity
        log.reward[i] = reward
        log.expected[i] = values[choice.index]
        log.optimum[i] = values.max()
        log.baseline[i] = base_value
        log.arm_set[i] = set_index
    return log
