"""Phased rollout with SLO rollback: how much traffic Thermostat may optimise right now.

Phases ``shadow`` (0 %) → ``canary`` (5 %) → ``guarded`` (25 %) → ``general``
(100 %). The share per phase can be overridden (config ``traffic_percentage``
applies to the configured phase; `set_phase(..., traffic=)` at runtime). Shadow
always optimises 0 %: the policy decides and is logged, baseline is sent.

Which requests are optimised: `assign(key, fraction)`, a blake2b hash of a
stable key (``x-thermostat-key`` header, else the body's ``user``, else the
request id) mapped to [0, 1): the same user gets the same treatment, and a user
optimised at 5 % stays optimised at 25 % (the buckets nest). The always-on holdout
(``optimization.holdout_fraction``, every phase) is drawn before it with its own salt,
``assign(key, holdout_fraction, "holdout")``, so the two shares are independent
(`proxy.decision.decider.BanditDecider.decide`).

Rollback (everything gets baseline parameters) has three triggers:

- ``slo``: `tick` sees an optimised-traffic SLO breach. Immediate; after
  ``slo.cooldown_s`` it resumes automatically **one phase lower** (never
  higher; shadow stays shadow). A manual `resume` before then also comes back one
  phase lower.
- ``manual``: `rollback(now, reason)` from the control API; `resume` returns to
  the phase it interrupted (one lower if an SLO rollback was under it).
- ``disabled``: `set_enabled(False)` (``LLM_OPTIMIZATION_ENABLED=false``).
  `set_enabled(True)` puts back what was there before: a manual rollback stays, an
  SLO rollback keeps its cooldown, otherwise optimisation resumes.

Automatic promotion (``rollout.auto_promote``) happens in `tick` once the phase
has lasted its minimum (``rollout.*_duration_hours``), no SLO breach was seen
since the phase started, and, from canary on, optimised traffic is *surely* better
than the always-on holdout: the anytime-valid lower bound of mean reward(optimised)
− mean reward(holdout), over this phase's requests, is > 0, with at least
``rollout.min_samples_for_promotion`` optimised rewards, on one signal kind, and no kind
says it is surely below.  The rewards are compared like with like: one comparison per kind
of `policies.signals.GUARDED_KINDS`, each reward recomputed with that kind's quality
(automatic at completion for every request; judge score, pairwise verdict or explicit
feedback later, for the requests that have one), never a mix in which unjudged requests
count as automatically perfect.  Each kind gets α/4 (`PROMOTION_KIND_ALPHA`), so the
chance of a promotion without a true improvement stays ≤ α.  ``general`` is final.
`set_phase` changes phases by hand.

Why anytime-valid.  `tick` checks promotion every second.  The old criterion, a
fixed-sample 95 % bootstrap bound of the OPE improvement, re-checked at every tick,
promotes a policy with no real improvement far more often than 5 % of the time: each
look is another chance for noise to cross 0 (bench/results/ope_coverage.md: 54 % false
alarms for a naive interval re-checked at every step).  The promotion evidence is
instead `policies.sequences.Comparison` (PrPl-EB confidence sequences at α/2 per stream,
α = `PROMOTION_ALPHA`), which holds at every look at once: under no true improvement
the chance that a phase is *ever* promoted on this criterion is ≤ α, however often it
is checked (tests/guards/test_guards_rollout.py simulates it).  Holdout requests are the
on-policy baseline (random assignment keys served the baseline), so the comparison
needs no model and no reweighting.  The comparison restarts whenever the phase (re)starts
(promotion, `set_phase`, resume): each promotion is judged on its own phase's traffic.
It lives in the controller, not in the persisted state: a restarted or replica process
starts a fresh sequence (valid, only slower), and every process promotes on its own
traffic, so with k replicas checking independently the bound is k·α.  The caller feeds
neither stream for a task type the conservative monitor rolled back (guards/conservative.py),
so both streams keep the same task mix.

Without holdout traffic (``optimization.holdout_fraction = 0``) there is no on-policy
baseline and automatic promotion from canary on is blocked (promote by hand).  The
caller's off-policy evidence (`OpeEvidence`, SNIPS improvement bound over the decision
log) is still reported by `promotion_check`, in the promote event and in
``/rollout-status``, but it no longer decides: it is a fixed-sample bound.

Every transition appends a `RolloutEvent` (time, from, to, reason, evidence) to
the state and is returned to the caller (for the audit log, alerts, metrics).
The whole `RolloutState` is a msgspec struct: `save_state`/`load_state` keep it
in a `StateStore`. The controller never reads a clock.

API::

    rollout = RolloutController.create(settings.rollout, settings.slo, monitor, now=now,
                                       phase=cfg.optimization.mode, enabled=cfg.optimization.enabled,
                                       traffic_percentage=cfg.optimization.traffic_percentage,
                                       state=await load_state(store))
    eff = rollout.effective(now)      # (optimizing_allowed, fraction, phase, rollback)
    optimised = eff.optimizing_allowed and assign(stable_key, eff.fraction)
    rollout.observe_reward(mode, reward)  # each completed request's reward (optimised vs holdout, for promotion)
    events = rollout.tick(now, ope)   # after each outcome and every few seconds; may roll back/resume/promote
    rollout.rollback(now, reason=..., actor=...) / rollout.resume(now, reason=..., actor=...)
    rollout.set_phase("canary", now, reason=..., actor=..., traffic=None) / rollout.set_enabled(False, now, ...)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal, NamedTuple

import msgspec

from guards.settings import MODE_TRAFFIC, MODES, RolloutSettings, SloSettings
from guards.slo import SloMonitor
from guards.state import StateStore
from policies import sequences
from policies.sequences import Comparison
from policies.signals import GUARDED_KINDS

Phase = Literal["shadow", "canary", "guarded", "general"]
Trigger = Literal["slo", "manual", "disabled"]
EventKind = Literal["rollback", "resume", "promote", "set_phase", "disable", "enable", "breach"]

STATE_KEY = "rollout:state"
PROMOTION_ALPHA = 0.05
"""Total error of the promotion comparisons: P(ever promoted without a true improvement) ≤ this."""
PROMOTION_KIND_ALPHA = PROMOTION_ALPHA / len(GUARDED_KINDS)
"""Each signal kind's comparison gets an equal share (α/2 of it per stream), so by the union bound the kinds together keep α."""
OPTIMISED_MODES = frozenset({"optimized", "guard_fallback"})
HOLDOUT_MODE = "holdout"
MAX_EVENTS = 200  # kept in the state blob; the audit log holds the full history
_TWO_64 = float(2**64)


def assign(key: str, fraction: float, salt: str = "") -> bool:
    """Deterministically put `key` in the optimised share `fraction` (0..1).

    blake2b (not `hash()`, which is salted per process) of ``salt + "\\0" + key``,
    read as a number in [0, 1); the key is in when that number is below `fraction`.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64 < fraction


def lower(phase: Phase) -> Phase:
    """The phase below (shadow is the floor)."""
    index = MODES.index(phase)
    return MODES[max(0, index - 1)]  # type: ignore[return-value]


def higher(phase: Phase) -> Phase | None:
    index = MODES.index(phase)
    return MODES[index + 1] if index + 1 < len(MODES) else None  # type: ignore[return-value]


class RollbackState(msgspec.Struct, frozen=True):
    active: bool = False
    trigger: Trigger | None = None
    reason: str | None = None
    since: float | None = None
    resumes_at: float | None = None  # automatic resume (SLO rollbacks only)
    interrupted_phase: Phase | None = None
    resume_phase: Phase | None = None  # where resuming goes
    cooldown_until: float | None = None  # SLO cooldown, kept if a manual/disabled rollback is layered on top
    prior_trigger: Trigger | None = None  # what a "disabled" rollback covered


class RolloutEvent(msgspec.Struct, frozen=True):
    at: float
    kind: EventKind
    from_: str = msgspec.field(name="from")  # a phase or "rollback"
    to: str = ""
    reason: str = ""
    evidence: dict[str, Any] = {}
    actor: str | None = None


class RolloutState(msgspec.Struct):
    phase: Phase
    phase_started_at: float
    rollback: RollbackState = RollbackState()
    traffic: dict[str, float] = {}  # per-phase share overrides
    configured_phase: Phase | None = None  # last phase set by configuration (to notice edits)
    configured_traffic: float | None = None
    last_breach_at: float | None = None
    events: list[RolloutEvent] = []


class OpeEvidence(msgspec.Struct, frozen=True):
    """Off-policy evidence for promotion, computed by the caller on exploration data."""

    improvement_lower_bound: float  # lower confidence bound of (policy - baseline) reward
    samples: int
    estimator: str = ""


class PromotionEvidence(msgspec.Struct, frozen=True):
    """Optimised vs holdout reward since the phase started, anytime-valid at 1 − alpha."""

    optimised_n: int
    holdout_n: int
    optimised_mean: float | None
    holdout_mean: float | None
    difference_lower: float  # L_opt − U_hold: promote only when > 0
    difference_upper: float  # U_opt − L_hold
    alpha: float
    since: float  # the phase start the comparison belongs to
    signal_kind: str = "automatic"  # rewards recomputed with this kind's quality (policies.signals.GUARDED_KINDS)


def promotion_evidence(c: Comparison, since: float, kind: str = "automatic") -> PromotionEvidence:
    """The comparison's difference bounds and sample sizes (pure; `policies.sequences.difference_bounds`)."""
    low, high = sequences.difference_bounds(c)

    def mean(s: sequences.MeanSequence) -> float | None:
        return s.low + (s.high - s.low) * s.sum_x / s.n if s.n else None

    return PromotionEvidence(
        optimised_n=c.optimised.n,
        holdout_n=c.holdout.n,
        optimised_mean=mean(c.optimised),
        holdout_mean=mean(c.holdout),
        difference_lower=low,
        difference_upper=high,
        alpha=c.optimised.alpha + c.holdout.alpha,
        since=since,
        signal_kind=kind,
    )


def deciding_evidence(evidence: list[PromotionEvidence], min_samples: int) -> PromotionEvidence:
    """The kind promotion decides on: the highest lower bound among kinds with enough rewards on both sides, else the fullest kind."""
    ready = [e for e in evidence if e.optimised_n >= min_samples and e.holdout_n > 0]
    if ready:
        return max(ready, key=lambda e: e.difference_lower)
    return max(evidence, key=lambda e: (e.optimised_n + e.holdout_n, e.signal_kind == "automatic"))


def promotion_blockers(e: PromotionEvidence, min_samples: int) -> list[str]:
    """What keeps this evidence from promoting: too few optimised rewards, no holdout, or no sure improvement."""
    blockers: list[str] = []
    if e.holdout_n == 0:
        blockers.append("no holdout rewards in this phase (optimization.holdout_fraction = 0 disables automatic promotion)")
    if e.optimised_n < min_samples:
        blockers.append(f"optimised rewards {e.optimised_n} < {min_samples}")
    if e.holdout_n and not e.difference_lower > 0.0:
        blockers.append(
            f"not surely better than holdout: anytime-valid {1 - e.alpha:.2%} lower bound of the reward difference "
            f"({e.signal_kind} signals) {e.difference_lower:.4g} <= 0"
        )
    return blockers


def worse_blockers(evidence: list[PromotionEvidence]) -> list[str]:
    """A kind on which optimised traffic is surely below holdout blocks promotion whatever another kind says."""
    return [
        f"surely worse than holdout on {e.signal_kind} signals: anytime-valid upper bound of the reward difference {e.difference_upper:.4g} < 0"
        for e in evidence
        if e.optimised_n and e.holdout_n and e.difference_upper < 0.0
    ]


class Effective(NamedTuple):
    optimizing_allowed: bool  # False: send baseline (shadow, rollback, disabled, 0 %)
    fraction: float  # share of keys to optimise (use with `assign`)
    phase: Phase
    rollback: RollbackState | None  # set while rolled back


class PromotionCheck(NamedTuple):
    ready: bool
    blockers: list[str]


class RolloutController:
    """Holds a `RolloutState` and applies the rules in the module docstring."""

    def __init__(
        self,
        settings: RolloutSettings,
        slo_settings: SloSettings,
        monitor: SloMonitor,
        state: RolloutState,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.settings = settings
        self.slo_settings = slo_settings
        self.monitor = monitor
        self.state = state
        self.reward_range = reward_range
        sequences.new_comparison(PROMOTION_KIND_ALPHA, *reward_range)  # validates the range
        self._comparisons: dict[str, Comparison] = {}
        self._comparison_since: float | None = None

    @classmethod
    def create(
        cls,
        settings: RolloutSettings,
        slo_settings: SloSettings,
        monitor: SloMonitor,
        *,
        now: float,
        phase: Phase = "shadow",
        enabled: bool = True,
        traffic_percentage: float | None = None,
        state: RolloutState | None = None,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> RolloutController:
        """Start fresh at `phase`, or continue a stored `state`.

        A stored state keeps its phase (promotions survive restarts) unless the
        configured `phase` or `traffic_percentage` changed since it was stored, in
        which case the operator's new configuration is applied as a `set_phase`.
        """
        if traffic_percentage is not None and not 0.0 <= traffic_percentage <= 1.0:
            raise ValueError("traffic_percentage must be a fraction in [0, 1]")
        if state is None:
            traffic: dict[str, float] = {phase: traffic_percentage} if traffic_percentage is not None else {}
            state = RolloutState(
                phase=phase,
                phase_started_at=now,
                traffic=traffic,
                configured_phase=phase,
                configured_traffic=traffic_percentage,
            )
            controller = cls(settings, slo_settings, monitor, state, reward_range)
        else:
            controller = cls(settings, slo_settings, monitor, state, reward_range)
            if state.configured_phase != phase or state.configured_traffic != traffic_percentage:
                if state.configured_phase is not None and state.configured_traffic is not None:
                    state.traffic = {k: v for k, v in state.traffic.items() if k != state.configured_phase}
                controller.set_phase(phase, now, reason="configuration changed", actor="config", traffic=traffic_percentage)
                state.configured_phase = phase
                state.configured_traffic = traffic_percentage
        controller.set_enabled(enabled, now, reason="configuration", actor="config")
        return controller

    # ---- reading ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        rb = self.state.rollback
        return not (rb.active and rb.trigger == "disabled")

    def fraction(self, phase: Phase) -> float:
        """Optimised share of `phase`: the override if any, else the phase default; shadow is 0."""
        if phase == "shadow":
            return 0.0
        return self.state.traffic.get(phase, MODE_TRAFFIC[phase])

    def effective(self, now: float) -> Effective:
        """What the request path should do at `now` (read-only).

        An SLO rollback whose cooldown has elapsed already counts as resumed here,
        so timing does not depend on how often `tick` runs; `tick` records it.
        """
        rb = self.state.rollback
        if rb.active:
            if rb.trigger == "slo" and rb.resumes_at is not None and now >= rb.resumes_at and rb.resume_phase:
                fraction = self.fraction(rb.resume_phase)
                return Effective(fraction > 0.0, fraction, rb.resume_phase, None)
            return Effective(False, 0.0, self.state.phase, rb)
        fraction = self.fraction(self.state.phase)
        return Effective(fraction > 0.0, fraction, self.state.phase, None)

    def comparison(self, kind: str = "automatic") -> Comparison:
        """This phase's optimised-vs-holdout reward comparison on one signal kind (fresh ones once the phase restarted)."""
        if self._comparison_since != self.state.phase_started_at:
            self._comparisons = {}
            self._comparison_since = self.state.phase_started_at
        c = self._comparisons.get(kind)
        if c is None:
            c = self._comparisons[kind] = sequences.new_comparison(PROMOTION_KIND_ALPHA, *self.reward_range)
        return c

    def observe_reward(self, mode: str, reward: float | None, kind: str = "automatic") -> None:
        """Fold one request's reward, recomputed with one signal kind's quality, into that kind's comparison.

        The automatic reward comes at completion; judge scores, pairwise verdicts and explicit
        feedback come later, once per request and kind. Other modes, unknown kinds and None are
        ignored. O(1) (a few running sums).  Rewards are clipped to `reward_range`, the bounds
        the reward formula can produce, so a stray value cannot break the sequence.
        """
        if reward is None or not math.isfinite(reward) or kind not in GUARDED_KINDS:
            return
        optimised = mode in OPTIMISED_MODES
        if not optimised and mode != HOLDOUT_MODE:
            return
        low, high = self.reward_range
        r = min(high, max(low, reward))
        c = self.comparison(kind)
        self._comparisons[kind] = sequences.observe_optimised(c, r) if optimised else sequences.observe_holdout(c, r)

    def promotion_evidences(self) -> list[PromotionEvidence]:
        """Every kind's evidence in this phase, in `GUARDED_KINDS` order."""
        return [promotion_evidence(self.comparison(kind), self.state.phase_started_at, kind) for kind in GUARDED_KINDS]

    def promotion_evidence(self, kind: str | None = None) -> PromotionEvidence:
        """One kind's evidence; by default the kind promotion decides on (`deciding_evidence`)."""
        if kind is not None:
            return promotion_evidence(self.comparison(kind), self.state.phase_started_at, kind)
        return deciding_evidence(self.promotion_evidences(), self.settings.min_samples_for_promotion)

    def promotion_check(self, now: float, ope: OpeEvidence | None = None) -> PromotionCheck:
        """Whether the current phase may be promoted at `now`, and what blocks it.

        `ope` is reported by the caller only; the decision uses the anytime-valid comparison (module docstring).
        """
        s = self.settings
        st = self.state
        blockers: list[str] = []
        if st.rollback.active:
            blockers.append("rolled back")
        nxt = higher(st.phase)
        if nxt is None:
            return PromotionCheck(False, ["general is the final phase"])
        hours = {"shadow": s.shadow_duration_hours, "canary": s.canary_duration_hours, "guarded": s.guarded_duration_hours}[st.phase]
        if now - st.phase_started_at < hours * 3600.0:
            blockers.append(f"{st.phase} lasts at least {hours:g} h")
        if st.last_breach_at is not None and st.last_breach_at >= st.phase_started_at:
            blockers.append("SLO breached during this phase")
        if st.phase != "shadow":
            evidence = self.promotion_evidences()
            blockers += promotion_blockers(deciding_evidence(evidence, s.min_samples_for_promotion), s.min_samples_for_promotion)
            blockers += worse_blockers(evidence)
        return PromotionCheck(not blockers, blockers)

    # ---- automatic transitions --------------------------------------------------

    def tick(self, now: float, ope: OpeEvidence | None = None) -> list[RolloutEvent]:
        """Apply due transitions: cooldown resume, SLO rollback, automatic promotion."""
        events: list[RolloutEvent] = []
        rb = self.state.rollback
        if rb.active and rb.trigger == "slo" and rb.resumes_at is not None and now >= rb.resumes_at:
            events.append(self._resume(rb.resumes_at, "cooldown elapsed", actor=None))
        report = self.monitor.report(now)
        if report.breached:
            self.state.last_breach_at = now
            evidence: dict[str, Any] = {
                "breached": list(report.breached),
                **report.evidence(),
                "thresholds": {
                    "latency_p99_ms": self.slo_settings.latency_p99_ms,
                    "quality_min": self.slo_settings.quality_min,
                    "error_rate_max": self.slo_settings.error_rate_max,
                },
            }
            event = self._slo_breach(now, "SLO breach: " + ", ".join(report.breached), evidence)
            if event is not None:
                events.append(event)
        if not events and self.settings.auto_promote and self.promotion_check(now, ope).ready:
            events.append(self._promote(now, ope))
        return events

    def _slo_breach(self, now: float, reason: str, evidence: dict[str, Any]) -> RolloutEvent | None:
        st = self.state
        rb = st.rollback
        if not rb.active:
            st.rollback = RollbackState(
                active=True,
                trigger="slo",
                reason=reason,
                since=now,
                resumes_at=now + self.slo_settings.cooldown_s,
                interrupted_phase=st.phase,
                resume_phase=lower(st.phase),
                cooldown_until=now + self.slo_settings.cooldown_s,
            )
            return self._event(now, "rollback", st.phase, "rollback", reason, evidence, None)
        # Already rolled back: late outcomes of the interrupted phase still count against it.
        assert rb.interrupted_phase is not None and rb.resume_phase is not None
        demoted = lower(rb.interrupted_phase)
        if MODES.index(demoted) < MODES.index(rb.resume_phase):
            st.rollback = msgspec.structs.replace(rb, resume_phase=demoted)
            return self._event(now, "breach", "rollback", "rollback", reason, {**evidence, "resume_phase": demoted}, None)
        return None

    def _promote(self, now: float, ope: OpeEvidence | None) -> RolloutEvent:
        st = self.state
        nxt = higher(st.phase)
        assert nxt is not None
        evidence: dict[str, Any] = {"phase_started_at": st.phase_started_at, "phase_duration_s": now - st.phase_started_at}
        kind = self.promotion_evidence().signal_kind
        if st.phase != "shadow":
            evidence["holdout_comparison"] = msgspec.to_builtins(self.promotion_evidence())
            evidence["holdout_comparisons"] = [msgspec.to_builtins(e) for e in self.promotion_evidences() if e.optimised_n or e.holdout_n]
        if ope is not None:
            evidence.update(ope_lower_bound=ope.improvement_lower_bound, ope_samples=ope.samples, ope_estimator=ope.estimator)
        previous = st.phase
        st.phase = nxt
        st.phase_started_at = now
        self._comparisons = {}
        reason = "minimum duration held without SLO breach"
        if previous != "shadow":
            reason += f"; optimised reward surely above holdout on {kind} signals (anytime-valid)"
        return self._event(now, "promote", previous, nxt, reason, evidence, None)

    # ---- manual transitions -----------------------------------------------------

    def rollback(self, now: float, *, reason: str = "", actor: str | None = None) -> RolloutEvent | None:
        """Manual rollback (control API). None if already manually rolled back or disabled."""
        st = self.state
        rb = st.rollback
        reason = reason or "manual rollback"
        if rb.active and rb.trigger in ("manual", "disabled"):
            return None
        if rb.active:  # on top of an SLO rollback: keep its (lower) resume phase, stop the auto resume
            st.rollback = msgspec.structs.replace(rb, trigger="manual", reason=reason, resumes_at=None)
            return self._event(now, "rollback", "rollback", "rollback", reason, {"resume_phase": rb.resume_phase}, actor)
        st.rollback = RollbackState(
            active=True,
            trigger="manual",
            reason=reason,
            since=now,
            interrupted_phase=st.phase,
            resume_phase=st.phase,
        )
        return self._event(now, "rollback", st.phase, "rollback", reason, {}, actor)

    def resume(self, now: float, *, reason: str = "", actor: str | None = None) -> RolloutEvent | None:
        """Manual resume: to the interrupted phase after a manual rollback, one lower after an SLO one.

        None if nothing is rolled back; ValueError while disabled (enable instead).
        """
        rb = self.state.rollback
        if not rb.active:
            return None
        if rb.trigger == "disabled":
            raise ValueError("optimisation is disabled; enable it instead of resuming")
        return self._resume(now, reason or "manual resume", actor)

    def set_enabled(self, enabled: bool, now: float, *, reason: str = "", actor: str | None = None) -> RolloutEvent | None:
        """Turn optimisation off (baseline for everyone) or back on; None when nothing changes."""
        st = self.state
        rb = st.rollback
        if not enabled:
            if not self.enabled:
                return None
            reason = reason or "optimisation disabled"
            if rb.active:
                st.rollback = msgspec.structs.replace(rb, trigger="disabled", reason=reason, resumes_at=None, prior_trigger=rb.trigger)
                return self._event(now, "disable", "rollback", "rollback", reason, {}, actor)
            st.rollback = RollbackState(
                active=True,
                trigger="disabled",
                reason=reason,
                since=now,
                interrupted_phase=st.phase,
                resume_phase=st.phase,
            )
            return self._event(now, "disable", st.phase, "rollback", reason, {}, actor)
        if self.enabled:
            return None
        reason = reason or "optimisation enabled"
        if rb.prior_trigger == "manual":
            st.rollback = msgspec.structs.replace(rb, trigger="manual", prior_trigger=None)
            return self._event(now, "enable", "rollback", "rollback", reason + " (manual rollback stays)", {}, actor)
        if rb.prior_trigger == "slo" and rb.cooldown_until is not None and now < rb.cooldown_until:
            st.rollback = msgspec.structs.replace(rb, trigger="slo", resumes_at=rb.cooldown_until, prior_trigger=None)
            return self._event(
                now, "enable", "rollback", "rollback", reason + " (SLO cooldown continues)", {"resumes_at": rb.cooldown_until}, actor
            )
        return self._resume(now, reason, actor, kind="enable")

    def set_phase(
        self, phase: Phase, now: float, *, reason: str = "", actor: str | None = None, traffic: float | None = None
    ) -> RolloutEvent:
        """Manual phase change (optionally with a traffic share for that phase).

        While rolled back, this sets the phase that resuming will go to.
        """
        if phase not in MODES:
            raise ValueError(f"unknown phase {phase!r} (allowed: {', '.join(MODES)})")
        if traffic is not None:
            if not 0.0 <= traffic <= 1.0:
                raise ValueError("traffic must be a fraction in [0, 1]")
            self.state.traffic = {**self.state.traffic, phase: traffic}
        st = self.state
        reason = reason or "phase set by hand"
        evidence: dict[str, Any] = {"traffic": self.fraction(phase)}
        if st.rollback.active:
            st.rollback = msgspec.structs.replace(st.rollback, interrupted_phase=phase, resume_phase=phase)
            return self._event(now, "set_phase", "rollback", "rollback", reason, {**evidence, "resume_phase": phase}, actor)
        previous = st.phase
        st.phase = phase
        st.phase_started_at = now
        self._comparisons = {}
        return self._event(now, "set_phase", previous, phase, reason, evidence, actor)

    # ---- helpers ----------------------------------------------------------------

    def _resume(self, at: float, reason: str, actor: str | None, kind: EventKind = "resume") -> RolloutEvent:
        st = self.state
        rb = st.rollback
        target: Phase = rb.resume_phase or st.phase
        st.phase = target
        st.phase_started_at = at
        self._comparisons = {}
        st.rollback = RollbackState()
        # The resumed phase is judged on its own traffic, not on what caused the rollback.
        self.monitor.discard_before(at)
        evidence = {"trigger": rb.trigger, "interrupted_phase": rb.interrupted_phase, "since": rb.since}
        return self._event(at, kind, "rollback", target, reason, evidence, actor)

    def _event(
        self, at: float, kind: EventKind, from_: str, to: str, reason: str, evidence: dict[str, Any], actor: str | None
    ) -> RolloutEvent:
        event = RolloutEvent(at=at, kind=kind, from_=from_, to=to, reason=reason, evidence=evidence, actor=actor)
        events = self.state.events
        events.append(event)
        if len(events) > MAX_EVENTS:
            del events[: len(events) - MAX_EVENTS]
        return event


async def save_state(store: StateStore, state: RolloutState, key: str = STATE_KEY) -> None:
    await store.set(key, msgspec.json.encode(state))


async def load_state(store: StateStore, key: str = STATE_KEY) -> RolloutState | None:
    raw = await store.get(key)
    return None if raw is None else msgspec.json.decode(raw, type=RolloutState)
