"""A decision log produced by the simulator, with its ground truth: for `thermostat evaluate` tests and benches.

Each simulated request goes through what the live decider does to the log, without the
network: the trust region of `config` (`proxy.learning.evaluate.TrustRegion`, the
decider's own `allowed_for`), a random holdout share served the baseline (mode
``holdout``), else the configured policy's choice with its propensity (mode
``optimized``), the simulator's outcome, the reward normalised by the task's baseline
costs, and a policy update.  The result is the `LogEntry` list the recorder would have
written, so it goes into any `LogStore` unchanged.
"""

from __future__ import annotations

import numpy as np

from policies.context import context_features
from policies.records import Decision, Outcome, Params, RequestContext
from policies.reward import compute_reward
from proxy.config import Config
from proxy.demo.simulator import SimulatorTruth
from proxy.learning import TrustRegion, make_candidate
from proxy.store import LogEntry


def simulated_log(
    config: Config,
    *,
    n_requests: int,
    seed: int,
    truth: SimulatorTruth | None = None,
    holdout_fraction: float = 0.1,
    start: float = 1_700_000_000.0,
    spacing_s: float = 1.0,
    model: str = "sim-1",
) -> list[LogEntry]:
    """`n_requests` logged decisions and outcomes, oldest first (randomness from `seed`)."""
    truth = truth or SimulatorTruth()
    settings = config.policy.reward
    names = list(truth.tasks)
    shares = np.array([truth.tasks[n].share for n in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    policy = make_candidate(config)
    region = TrustRegion(config, policy)
    entries = []
    for i in range(n_requests):
        task = names[int(rng.choice(len(names), p=shares / shares.sum()))]
        profile = truth.profile(task)
        z = rng.standard_normal(4)
        prompt_tokens = truth.prompt_tokens(task, float(z[0]))
        ctx = RequestContext(
            task_type=task, model=model, endpoint="chat", prompt_tokens_est=prompt_tokens, message_count=2, has_tools=False,
            json_mode=False, stream=False, client_temperature=profile.client_temperature, client_max_tokens=profile.client_max_tokens,
        )
        base, arms = region.allowed(ctx)
        baseline = Params(temperature=base.temperature, max_tokens=base.max_tokens)
        if rng.random() < holdout_fraction:
            arm, propensity, mode = base, 1.0, "holdout"
        else:
            choice = policy.choose(ctx, base, arms, rng)
            arm, propensity, mode = arms[choice.index], choice.propensity, "optimized"
        sim = truth.respond(task, arm, natural_tokens=truth.natural_length(task, float(z[1])), prompt_tokens=prompt_tokens,
                            quality_z=float(z[2]), latency_z=float(z[3]))
        base_latency, base_tokens = truth.normalisers(task, base)
        reward = compute_reward(quality=sim.quality, latency_s=sim.latency_s, tokens=sim.completion_tokens,
                                baseline_latency_s=base_latency, baseline_tokens=base_tokens, settings=settings)
        policy.update(ctx, base, arm, reward)
        request_id = f"sim-{seed}-{i}"
        decision = Decision(
            request_id=request_id, context=ctx, context_fingerprint=0, sent=Params(temperature=arm.temperature, max_tokens=arm.max_tokens),
            baseline=baseline, propensity=propensity, policy=policy.name, policy_version=policy.version, mode=mode,
            created_at=start + i * spacing_s,
        )
        outcome = Outcome(request_id=request_id, status=200, latency_s=sim.latency_s, ttft_s=sim.ttft_s, prompt_tokens=prompt_tokens,
                          completion_tokens=sim.completion_tokens, finish_reason=sim.finish_reason, quality=sim.quality, reward=reward)
        entries.append(LogEntry(decision=decision, outcome=outcome, context_features=context_features(ctx)))
    return entries
