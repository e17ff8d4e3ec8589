"""`thermostat evaluate`: what would a candidate configuration have earned on the logged traffic?

Read before deploying a change.  Per task type, on the decision log:

* **Candidate value** by IPS, SNIPS and DR (`policies.ope`), each with an interval (IPS:
  the betting interval, valid under the learning logger's adaptive logging; SNIPS and DR:
  their studentised bootstrap interval united with it) and an empirical-Bernstein interval,
  and the effective sample size.  Only rows with mode ``optimized`` carry a behaviour propensity, so only they are
  reweighted.
* **Holdout baseline**: rows with mode ``holdout`` were served the baseline at random,
  so their mean reward is an on-policy estimate of the baseline, no reweighting needed
  (same intervals, weights 1).
* **Support**: the target's probability mass on arms the logged behaviour did not play:
  outside the logging configuration's trust region, or inside it but never actually
  sent for that task and baseline in the log (the live decider offers fewer arms than
  the region: temperature waits for quality signals, a lower cap for length evidence,
  so a demo that always sent max_tokens=800 played 5 of the candidate's 25 arms).  The
  log does not record the behaviour's whole distribution, so "played at least once" is
  the evidence of support.  Mass outside it is not identified by the log; the report
  then says the estimate is unsupported and prints none for that task.

How the candidate's probabilities are obtained.  The candidate policy (its name and
settings from the candidate config, `policies.registry.make_policy`) is replayed through the
log in time order: for each logged row it is first asked for its probabilities over
the arms the candidate's trust region allows (`ArmSpace.allowed_for`, built from
the candidate config; the live decider's length check on lower caps, `candidates`, is
not replayed, so the candidate is valued over its whole region), with the live decider's
two-stage pmf (`TwoStageSampler.pmf`: the temperature from signal-only statistics, fed by
the rows with feedback), then it learns
the logged reward of the logged arm, as the live decider does (`BanditDecider.observe`
updates on every served request).  The target
probabilities of row i thus depend only on rows before i, so the weights are
predictable and the estimates are those of the candidate *learning on this traffic*.
One caveat the report repeats: the candidate learns from the arms the logging policy
chose, not from its own choices.

The behaviour's allowed arms (for the support check) come the same way from the
logging config (`--log-config`, default the candidate config).  Its propensity floor
(`[policy.<name>] min_propensity`) and its reward settings bound the importance weights
and the rewards, which makes the empirical-Bernstein intervals valid.

Everything heavy (policy replay, bootstrap, plots) runs synchronously: this is a
command-line tool, never on the proxy's event loop.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import msgspec
import numpy as np

from policies import ope
from policies.arms import arm_key, arm_model_key
from policies.base import Policy
from policies.context import context_bucket
from policies.quality import learns
from policies.records import Arm, RequestContext
from policies.registry import make_policy
from policies.reward import reward_bounds
from proxy.config import Config
from proxy.decision import (
    ArmSettings,
    ArmSpace,
    DeciderSettings,
    ModelEvidence,
    TwoStageSampler,
    context_from_features,
    declared_stand_ins,
    limits_for,
)
from proxy.store import DecisionRow, LogStore

METHODS = ("ips", "snips", "dr")
PLOTS_MISSING = ("No plots: matplotlib is not installed. `.venv/bin/pip install -e '.[plots]'` (or `pip install matplotlib`) "
                 "and run the command again to get reward_over_time.png, estimates.png and weights.png.")
PAGE_ROWS = 5000


def make_candidate(config: Config) -> Policy:
    """The policy `config` would run, fresh (it learns during the replay)."""
    return make_policy(config.optimization.policy, thompson=config.policy.thompson, linucb=config.policy.linucb)


def min_propensity(config: Config) -> float | None:
    """The logging policy's propensity floor (None for policies without one)."""
    name = config.optimization.policy
    if name == "thompson_gaussian":
        return config.policy.thompson.min_propensity
    if name == "linucb":
        return config.policy.linucb.min_propensity
    return None


def reward_range(config: Config) -> tuple[float, float]:
    """The bounds of every reward under `config` (`policies.reward.reward_bounds`, the one copy)."""
    return reward_bounds(config.policy.reward)


class TrustRegion:
    """The arms a configuration allows for a logged context: the live decider's own arm space and sampler.

    No budget, rollout or SLO; temperature moves once the task has `min_quality_signals`
    explicit scores, counted as the replay goes (`signal`), as it did live.
    """

    def __init__(self, config: Config, policy: Policy) -> None:
        self.arms = ArmSpace(
            ArmSettings.from_config(config), baseline_for=config.baseline_for, limits_for=functools.partial(limits_for, config.upstreams),
            stand_ins_for=functools.partial(declared_stand_ins, config.upstreams),
        )
        models = ModelEvidence(DeciderSettings.from_config(config).models)
        self.arms.model_admitted = models.admits
        self.sampler = TwoStageSampler(policy, models)
        self.sampler.has_stand_ins = self.arms.stand_ins_for

    def allowed(self, ctx: RequestContext) -> tuple[Arm, list[Arm]]:
        """The baseline and the trust region's arms (`allowed_for`), the declared stand-ins' included."""
        options = self.arms.options(ctx, safe_caps=False)
        return options.reference.arm, options.allowed

    def signal(self, task_type: str) -> None:
        self.arms.signals.add(task_type)


class MethodEstimate(msgspec.Struct, frozen=True):
    method: str
    value: float
    ci_low: float  # policies.ope.Estimate.ci_low: IPS betting, SNIPS/DR studentised bootstrap ∪ betting (clipped to the reward range)
    ci_high: float
    eb_low: float | None  # empirical Bernstein (None: unbounded)
    eb_high: float | None
    ess: float
    eb_informative: bool = True  # False: the empirical-Bernstein interval spans the whole reward range


class TaskEvaluation(msgspec.Struct, frozen=True):
    task_type: str
    optimised_rows: int
    holdout_rows: int
    logged_mean: float | None  # mean reward of the optimised rows (the behaviour's value)
    holdout: MethodEstimate | None  # on-policy baseline
    candidate: list[MethodEstimate]  # empty when refused or without data
    ess: float | None
    max_weight: float | None
    unsupported_mass: float | None
    outside_logged_region: int  # optimised rows whose logged arm the logging config no longer allows
    refused: str | None = None  # why no candidate estimate is given
    candidate_arms: int = 0  # distinct (baseline, arm) pairs the candidate chose among over the optimised rows
    played_arms: int = 0  # how many of those the logged behaviour actually sent
    unsupported: bool = False  # refused because the candidate leans on arms the log never played


class Evaluation(msgspec.Struct, frozen=True):
    candidate_policy: str
    logging_policy: str
    since: float
    until: float
    rows_read: int
    tasks: list[TaskEvaluation]
    confidence: float
    min_propensity: float | None
    reward_range: tuple[float, float]


class _Replay(msgspec.Struct):
    """Per task, the arrays OPE needs (built in time order)."""

    rewards: list[float] = msgspec.field(default_factory=list)
    behaviour: list[float] = msgspec.field(default_factory=list)
    target: list[float] = msgspec.field(default_factory=list)
    target_probs: list[list[float]] = msgspec.field(default_factory=list)
    supported: list[list[float]] = msgspec.field(default_factory=list)  # 1: inside the logging config's region
    moves: list[list[str]] = msgspec.field(default_factory=list)  # per row, each candidate arm as (baseline, arm)
    played: set[str] = msgspec.field(default_factory=set)  # the (baseline, arm) pairs the behaviour sent
    logged_keys: list[str] = msgspec.field(default_factory=list)
    candidate_keys: list[list[str]] = msgspec.field(default_factory=list)
    outside: int = 0
    holdout: list[float] = msgspec.field(default_factory=list)


def _key(bucket: str, arm: Arm) -> str:
    t, m = arm_key(arm)
    return f"{bucket}|{t:g}|{m}" if arm.model is None else f"{bucket}|{t:g}|{m}#{arm.model}"


def _move(base: Arm, arm: Arm) -> str:
    """An arm as played from a baseline: the support unit (the candidate's arms are built per baseline)."""
    return f"{arm_key(base)}>{arm_key(arm)}" if arm.model is None else f"{arm_key(base)}>{arm_key(arm)}#{arm.model}"


def replay(rows: Sequence[DecisionRow], candidate_config: Config, log_config: Config) -> tuple[dict[str, _Replay], dict[str, list[tuple[float, str, float]]]]:
    """Walk the log oldest first: candidate probabilities before each update (module docstring).

    Returns per task the OPE arrays, and per task (time, mode, reward) for the plots.
    """
    policy = make_candidate(candidate_config)
    target_region = TrustRegion(candidate_config, policy)
    logged_region = TrustRegion(log_config, policy)
    out: dict[str, _Replay] = defaultdict(_Replay)
    series: dict[str, list[tuple[float, str, float]]] = defaultdict(list)
    for r in sorted(rows, key=lambda row: row.timestamp):
        reward = r.effective_reward
        ctx = context_from_features(r.context_features)
        if ctx is None or reward is None or not math.isfinite(reward) or not learns(r.status, r.error_class):
            continue
        series[r.task_type].append((r.timestamp, r.mode, reward))
        base = r.baseline_params.arm()
        logged = r.chosen_params.arm(r.baseline_params)
        if r.mode == "holdout":
            out[r.task_type].holdout.append(reward)
        elif r.mode == "optimized" and math.isfinite(r.log_propensity):
            rep = out[r.task_type]
            _, arms = target_region.allowed(ctx)
            _, logged_arms = logged_region.allowed(ctx)
            probs = target_region.sampler.pmf(ctx, base, arms)  # as the live decider plays: temperature stage first
            keys = [arm_model_key(a) for a in arms]
            logged_keys = {arm_model_key(a) for a in logged_arms}
            rep.outside += arm_model_key(logged) not in logged_keys
            idx = keys.index(arm_model_key(logged)) if arm_model_key(logged) in keys else None
            bucket = context_bucket(ctx)
            rep.rewards.append(reward)
            rep.behaviour.append(math.exp(r.log_propensity))
            rep.target.append(float(probs[idx]) if idx is not None else 0.0)
            rep.target_probs.append(probs.tolist())
            rep.supported.append([1.0 if k in logged_keys else 0.0 for k in keys])
            rep.moves.append([_move(base, a) for a in arms])
            rep.played.add(_move(base, logged))
            rep.logged_keys.append(_key(bucket, logged))
            rep.candidate_keys.append([_key(bucket, a) for a in arms])
        if r.feedback_quality is not None:
            target_region.signal(r.task_type)
            logged_region.signal(r.task_type)
            # A signal that sees temperature: the temperature-only statistics learn it too (BanditDecider.pmf).
            target_region.sampler.learn_signal(ctx, r.baseline_params, r.chosen_params, reward, None, logged_version=policy.version)
            for region in (target_region, logged_region):  # the model stage's evidence, as live (judge and explicit scores)
                region.sampler.models.observe(r.task_type, r.chosen_params.model, r.feedback_source or "explicit", r.feedback_quality)
        policy.update(ctx, base, logged, reward)
    return out, series


def _padded(rows: list[list[float]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _method(e: ope.Estimate) -> MethodEstimate:
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return MethodEstimate(method=e.estimator, value=e.value, ci_low=e.ci_low, ci_high=e.ci_high, eb_low=finite(e.eb_low), eb_high=finite(e.eb_high), ess=e.ess)


def informative(e: MethodEstimate, bounds: tuple[float, float]) -> MethodEstimate:
    """Mark an empirical-Bernstein interval that spans the whole reward range: it says nothing
    (with weights up to 1/floor its width is about the range itself), so it is not shown as a result."""
    lo, hi = bounds
    slack = 1e-9 * max(1.0, hi - lo)
    says_nothing = e.eb_low is None or e.eb_high is None or (e.eb_low <= lo + slack and e.eb_high >= hi - slack)
    return msgspec.structs.replace(e, eb_informative=not says_nothing)


def played_support(rep: _Replay) -> np.ndarray:
    """(n, K) 0/1: inside the logging region and actually played by the behaviour (module docstring)."""
    inside = _padded(rep.supported)
    played = _padded([[1.0 if m in rep.played else 0.0 for m in row] for row in rep.moves])
    return inside * played


def evaluate_task(
    task: str,
    rep: _Replay,
    *,
    floor: float | None,
    bounds: tuple[float, float],
    rng: np.random.Generator,
    n_bootstrap: int,
    confidence: float,
) -> TaskEvaluation:
    holdout = None
    if len(rep.holdout) >= 2:
        ones = np.ones(len(rep.holdout))
        on_policy = ope.evaluate(
            rewards=np.asarray(rep.holdout), behaviour_propensity=ones, target_propensity=ones, rng=rng,
            n_bootstrap=n_bootstrap, confidence=confidence, min_propensity=1.0, reward_range=bounds,
        )
        holdout = informative(msgspec.structs.replace(_method(on_policy.ips), method="holdout"), bounds)
    n = len(rep.rewards)
    offered = {m for row in rep.moves for m in row}
    head = TaskEvaluation(
        task_type=task, optimised_rows=n, holdout_rows=len(rep.holdout), holdout=holdout, outside_logged_region=rep.outside,
        logged_mean=float(np.mean(rep.rewards)) if n else None, candidate=[], ess=None, max_weight=None, unsupported_mass=None,
        candidate_arms=len(offered), played_arms=len(offered & rep.played),
    )
    if n < 2:
        return msgspec.structs.replace(head, refused=f"{n} optimised row(s) with a reward; at least 2 are needed")
    rewards = np.asarray(rep.rewards)
    target_probs = _padded(rep.target_probs)
    q_logged, q_candidates = ope.cross_fit_tabular(rep.logged_keys, rewards, rep.candidate_keys)
    try:
        report = ope.evaluate(
            rewards=rewards, behaviour_propensity=np.asarray(rep.behaviour), target_propensity=np.asarray(rep.target), rng=rng,
            reward_hat_logged=q_logged, target_value_hat=ope.expected_under(target_probs, q_candidates), n_bootstrap=n_bootstrap,
            confidence=confidence, min_propensity=floor, reward_range=bounds,
            behaviour_probs=played_support(rep), target_probs=target_probs,
        )
    except ope.UnsupportedTarget as exc:
        return msgspec.structs.replace(
            head, unsupported_mass=exc.support.unsupported_mass + exc.support.below_floor_mass, refused=str(exc), unsupported=True,
        )
    estimates = [cast(ope.Estimate, getattr(report, m)) for m in METHODS]
    return msgspec.structs.replace(
        head, candidate=[informative(_method(e), bounds) for e in estimates], ess=report.ess, max_weight=report.max_weight,
        unsupported_mass=report.support.unsupported_mass + report.support.below_floor_mass if report.support else None,
    )


async def read_log(store: LogStore, *, since: float, until: float, task_type: str | None, max_rows: int) -> list[DecisionRow]:
    """Up to `max_rows` decisions in [since, until), newest first, read in pages."""
    rows: list[DecisionRow] = []
    while len(rows) < max_rows:
        page = await store.fetch_decisions(since=since, until=until, task_type=task_type, limit=min(PAGE_ROWS, max_rows - len(rows)), offset=len(rows))
        rows += page
        if len(page) < PAGE_ROWS:
            break
    return rows


def evaluate_log(
    rows: Sequence[DecisionRow],
    candidate_config: Config,
    log_config: Config,
    *,
    since: float,
    until: float,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> tuple[Evaluation, dict[str, _Replay], dict[str, list[tuple[float, str, float]]]]:
    reps, series = replay(rows, candidate_config, log_config)
    floor, bounds = min_propensity(log_config), reward_range(log_config)
    rng = np.random.default_rng(seed)
    tasks = [evaluate_task(t, reps[t], floor=floor, bounds=bounds, rng=rng, n_bootstrap=n_bootstrap, confidence=confidence) for t in sorted(reps)]
    evaluation = Evaluation(
        candidate_policy=candidate_config.optimization.policy, logging_policy=log_config.optimization.policy, since=since, until=until,
        rows_read=len(rows), tasks=tasks, confidence=confidence, min_propensity=floor, reward_range=bounds,
    )
    return evaluation, reps, series


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _eb(e: MethodEstimate) -> str:
    return f"[{_fmt(e.eb_low)}, {_fmt(e.eb_high)}]" if e.eb_informative else "uninformative"


def markdown(ev: Evaluation, plots: Sequence[str], plots_missing: str | None = None) -> str:
    pct = round(ev.confidence * 100)
    lines = [
        "# Offline evaluation of a candidate configuration",
        "",
        f"Candidate policy `{ev.candidate_policy}` on the log of `{ev.logging_policy}`, "
        f"{ev.rows_read} decisions from {_iso(ev.since)} to {_iso(ev.until)}.",
        "",
        f"Intervals at {pct} %: *bootstrap* (IPS: the betting interval, valid although the logging policy learnt as it logged; "
        "SNIPS, DR: the studentised bootstrap-t united with it; policies/ope.py) and *EB* (empirical Bernstein, valid given the "
        f"propensity floor {ev.min_propensity if ev.min_propensity is not None else 'none'} and the reward range "
        f"[{ev.reward_range[0]:g}, {ev.reward_range[1]:g}]; – means no bound; *uninformative* means it spans that whole "
        "range, as it does when the weights may reach 1/floor: it says nothing about the value). ESS: the number of on-policy samples the "
        "reweighted log is worth. The candidate is replayed through the log in time order and learns from the logged "
        "arms, not from its own choices (proxy/learning/evaluate.py). Holdout: mean reward of the randomised holdout "
        "(the baseline, on-policy).",
        "",
        "| task | method | estimate | bootstrap | EB | ESS | vs holdout |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for t in ev.tasks:
        hold = t.holdout
        if hold is not None:
            lines.append(f"| {t.task_type} | holdout | {hold.value:.4f} | [{hold.ci_low:.4f}, {hold.ci_high:.4f}] | "
                         f"{_eb(hold)} | {t.holdout_rows} | – |")
        if t.logged_mean is not None:
            lines.append(f"| {t.task_type} | logged (behaviour) | {t.logged_mean:.4f} | – | – | {t.optimised_rows} | "
                         f"{_fmt(t.logged_mean - hold.value) if hold else '–'} |")
        for e in t.candidate:
            diff = _fmt(e.value - hold.value) if hold else "–"
            lines.append(f"| {t.task_type} | {e.method.upper()} | {e.value:.4f} | [{e.ci_low:.4f}, {e.ci_high:.4f}] | "
                         f"{_eb(e)} | {e.ess:.1f} | {diff} |")
        if t.unsupported:
            lines.append(f"| {t.task_type} | candidate | unsupported: no estimate | – | – | – | – |")
            notes.append(
                f"- **{t.task_type}**: the estimate is unsupported, so none is printed. The logged behaviour played "
                f"{t.played_arms} of the {t.candidate_arms} arms the candidate chooses among, and the candidate puts "
                f"{_pct(t.unsupported_mass)} of its probability on arms never played (or outside the logging config's trust "
                "region): what they would earn is not in the log. Log traffic that plays those arms first (a candidate "
                f"confined to the played arms can be evaluated). Detail: {t.refused}.")
        elif t.refused:
            lines.append(f"| {t.task_type} | candidate | no estimate | – | – | – | – |")
            notes.append(f"- **{t.task_type}**: no estimate of the candidate: {t.refused}.")
        if t.outside_logged_region:
            notes.append(f"- **{t.task_type}**: {t.outside_logged_region} logged arm(s) lie outside the logging config's "
                         "trust region as rebuilt today: the log config may have changed during the window.")
        if t.max_weight is not None and t.ess is not None and t.optimised_rows and t.ess < 0.1 * t.optimised_rows:
            notes.append(f"- **{t.task_type}**: ESS {t.ess:.1f} of {t.optimised_rows} rows (max weight {t.max_weight:.1f}): "
                         "the candidate is far from the logged behaviour; trust the intervals, not the point estimates.")
    if any(not e.eb_informative for t in ev.tasks for e in t.candidate):
        notes.append("- Empirical-Bernstein intervals marked *uninformative* span the whole reward range: with importance "
                     "weights bounded only by 1/floor they cannot narrow on this much data; read the bootstrap intervals.")
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Plots", ""]
    lines += [plots_missing] if plots_missing else [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def plot(ev: Evaluation, reps: dict[str, _Replay], series: dict[str, list[tuple[float, str, float]]], out: Path, bins: int = 30) -> list[str]:
    """reward_over_time.png, estimates.png, weights.png in `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t.task_type for t in ev.tasks] or ["(none)"]
    paths = []

    stamps = [t for points in series.values() for t, _, _ in points]
    first, last = (min(stamps), max(stamps)) if stamps else (ev.since, ev.until)  # the data's span, not the window's
    edges = np.linspace(first, last + 1e-6, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2 - first
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 2.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        points = series.get(task, [])
        for label, modes in (("optimised", {"optimized", "guard_fallback"}), ("holdout", {"holdout"})):
            chosen = [(t, r) for t, m, r in points if m in modes]
            if not chosen:
                continue
            times, rewards = np.asarray([c[0] for c in chosen]), np.asarray([c[1] for c in chosen])
            idx = np.clip(np.digitize(times, edges) - 1, 0, bins - 1)
            counts = np.bincount(idx, minlength=bins)
            sums = np.bincount(idx, weights=rewards, minlength=bins)
            mask = counts > 0
            ax.plot(centres[mask] / 3600.0, sums[mask] / counts[mask], marker=".", label=label)
        ax.set_title(f"{task}: mean reward per time bin")
        ax.set_xlabel("hours since the first logged decision")
        ax.legend(loc="best")
    fig.tight_layout()
    paths.append(str(out / "reward_over_time.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 2.4 * len(tasks)), squeeze=False)
    by_task = {t.task_type: t for t in ev.tasks}
    for ax, task in zip(axes[:, 0], tasks):
        t = by_task.get(task)
        entries = ([t.holdout] if t and t.holdout else []) + (t.candidate if t else [])
        for y, e in enumerate(entries):
            ax.errorbar([e.value], [y], xerr=[[max(0.0, e.value - e.ci_low)], [max(0.0, e.ci_high - e.value)]], fmt="o", capsize=4)
        ax.set_yticks(range(len(entries)), [e.method.upper() if e.method != "holdout" else "holdout" for e in entries])
        ax.set_title(f"{task}: estimated value with {round(ev.confidence * 100)} % bootstrap interval"
                     + ("" if not t or not t.refused else " (candidate refused: no support)"))
        ax.set_xlabel("reward")
    fig.tight_layout()
    paths.append(str(out / "estimates.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.4 * len(tasks)), squeeze=False)
    for (ax_p, ax_w), task in zip(axes, tasks):
        rep = reps.get(task)
        if rep is not None and rep.behaviour:
            mu, pi = np.asarray(rep.behaviour), np.asarray(rep.target)
            ax_p.hist(mu, bins=30)
            ax_w.hist(pi / mu, bins=30)
            ax_w.set_yscale("log")
        ax_p.set_title(f"{task}: behaviour propensity")
        ax_w.set_title(f"{task}: importance weight π/μ")
    fig.tight_layout()
    paths.append(str(out / "weights.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths


def write_report(ev: Evaluation, reps: dict[str, _Replay], series: dict[str, list[tuple[float, str, float]]], out: Path) -> Path:
    """report.md, report.json (the numbers) and the plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths, missing = plot(ev, reps, series, out), None
    except ImportError:  # matplotlib is optional: the numbers are the report, the plots an extra
        paths, missing = [], PLOTS_MISSING
    (out / "report.json").write_bytes(msgspec.json.format(msgspec.json.encode(ev)))
    report = out / "report.md"
    report.write_text(markdown(ev, paths, missing), encoding="utf-8")
    return report


async def run(
    candidate_config: Config, log_config: Config, store: LogStore, *, since: float, until: float, task_type: str | None,
    out: Path, max_rows: int = 200_000, seed: int = 0, n_bootstrap: int = 1000,
) -> tuple[Path, Evaluation]:
    """Read the log, evaluate, write the report (the CLI's body)."""
    rows = await read_log(store, since=since, until=until, task_type=task_type, max_rows=max_rows)
    ev, reps, series = evaluate_log(rows, candidate_config, log_config, since=since, until=until, seed=seed, n_bootstrap=n_bootstrap)
    return write_report(ev, reps, series, out), ev



def open_reader(config: Config) -> tuple[LogStore, str]:
    """The decision log `config` writes, opened for reading only (no spool: nothing is written)."""
    if config.storage.database_url:
        from proxy.store import PostgresLogStore

        return PostgresLogStore(config.storage.database_url, min_size=1, max_size=1), "PostgreSQL"
    from proxy.store import SqliteSink

    path = Path(config.server.data_dir) / "decisions.sqlite3"
    if not path.exists():
        raise FileNotFoundError(f"no decision log at {path} (set server.data_dir or storage.database_url in the log config)")
    return SqliteSink(path), str(path)


async def evaluate_command(
    candidate_config: Config, log_config: Config, *, since_s: float, task_type: str | None, out: Path, max_rows: int, seed: int,
    now: float,
) -> tuple[Path, Evaluation, str]:
    """`thermostat evaluate`: open the log, evaluate the last `since_s` seconds, write the report."""
    store, where = open_reader(log_config)
    await store.open()
    try:
        report, ev = await run(candidate_config, log_config, store, since=now - since_s, until=now + 1.0, task_type=task_type,
                               out=out, max_rows=max_rows, seed=seed)
    finally:
        await store.close()
    return report, ev, where
