"""A lower max_tokens only where the task's own answers say it will not cut more than the client's cap.

Why. Lowering a cap changes nothing for an answer that ends below it, and cuts the
answers that run past it. The automatic quality score charges a cut answer 0.4, while a
real user loses what the missing part was worth, so a policy that only sees the automatic
score trades real quality for saved tokens (measured: up to 3 % true quality lost on three
of four simulated tasks, bench/safe_learning.py). Without quality evidence the only
defensible lower cap is one that (almost) never cuts more than the client's own cap does.

What is tested. For a lower cap m' under the baseline cap m0, the *extra truncation* is
p = P(m' < L <= m0), L the answer's natural length: the answers m' cuts and m0 does not.
A lower cap is admitted (`TruncationGuard.admits`) only while the task's observed answers
reject "p >= max_extra_truncation" (δ) at level α = 0.05, with an anytime-valid test, so
checking it on every request does not inflate the error: the chance that a cap with
p >= δ is *ever* admitted is at most α. Raising a cap never cuts more, so arms at or above
m0 are always admitted.

Observations. Every finished answer of the same (upstream, model, task, temperature,
baseline cap) — holdout, optimised, any cap sent — gives an indicator X for each tracked m':

* uncut with L tokens: L is known, X = 1[m' < L <= m0] exactly;
* cut at the cap c that was sent: L > c. If c >= m0 the answer was cut at m0 as well
  (X = 0); otherwise whether L <= m0 is unknown and X = 1, the pessimistic value.

So E[X | past] >= p whatever caps the policy sent: the indicators over-state the extra
truncation, never under-state it. Temperature is part of the key because hotter answers
run longer: what a cap does at one temperature says nothing about another.

The test (a discrete mixture of likelihood ratios, with a ceiling). For each of K points
q_j = δ·(j+1)/(K+1) in (0, δ), the ratio Π (q_j/δ)^X ((1−q_j)/(1−δ))^(1−X) has
conditional expectation q·q_j/δ + (1−q)(1−q_j)/(1−δ) <= 1 whenever q >= δ (it falls with
q because q_j < δ), so it is a non-negative supermartingale under the null. The wealth
M_n = min(C, M_{n−1} · Σ_j w_j f_j(X_n)), with w_j the components' predictable
(posterior) weights, is one too: a predictable average of factors with mean <= 1, and
min(C, ·) is concave (Jensen). Ville's inequality then gives P(sup M_n >= 1/α) <= α.
The ceiling C = 4/α is what lets a cap leave the safe set within a few hundred answers
after the answers grow (a model change): without it, wealth piled up over months would
take as long to spend. Zero observed extra cuts admit a cap after at most
ln(K/α)/(δ·K/(K+1)) answers (~1,140 at δ = 0.005; ~940 in fact, the other components
help); one extra cut costs it a factor of up to (K+1).

State is per process (like the quality-signal counter), bounded by `max_keys`; a key
past the bound is never tracked, so its lower caps stay closed (the safe side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
"""Level of the test: a cap whose extra truncation is >= δ is ever admitted with probability <= ALPHA."""
COMPONENTS = 8
LOG_ADMIT = math.log(1.0 / ALPHA)
LOG_CEILING = math.log(4.0 / ALPHA)

TruncationKey = tuple[str, str, str, float, int]
"""(upstream, model, task type, temperature, baseline max_tokens)."""


def extra_cut(lower: int, base: int, sent_cap: int, tokens: int, cut: bool) -> bool:
    """The pessimistic indicator X (module docstring): would `lower` have cut an answer `base` did not?"""
    if not cut:
        return lower < tokens <= base
    return sent_cap < base  # cut below the baseline cap: unknown whether `base` would have cut it


def components(delta: float, k: int = COMPONENTS) -> np.ndarray:
    """The mixture's alternatives q_j = δ·(j+1)/(k+1), all strictly inside (0, δ)."""
    return delta * np.arange(1, k + 1, dtype=np.float64) / (k + 1)


def log_factors(q: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """log f_j for an extra cut (X = 1) and for none (X = 0): constant per guard, so computed once."""
    return np.log(q / delta), np.log1p(-q) - math.log1p(-delta)


def wealth_step(log_wealth: np.ndarray, log_weights: np.ndarray, q: np.ndarray, delta: float, bad: np.ndarray,
                factors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """One observation for several caps at once (rows), in place.

    log_wealth (C,), log_weights (C, K) normalised per row, bad (C,) bool. Each row's factor
    is g = Σ_j w_j f_j with f_j = q_j/δ (bad) or (1−q_j)/(1−δ); wealth becomes min(ceiling,
    wealth·g) and the weights their posterior w_j f_j / g. `factors` is `log_factors(q, delta)`,
    passed in by the guard because this runs once per answer.

    The log-sum-exp needs no shift: the weights are normalised, so the largest is at least
    1/K, and every log f_j is at least log(1/(K+1)), so the largest term of each row is above
    −log(K(K+1)) and the sum can neither underflow to zero nor overflow.
    """
    log_bad, log_good = factors if factors is not None else log_factors(q, delta)
    joint = log_weights + (np.where(bad[:, None], log_bad, log_good) if bad.any() else log_good)
    log_g = np.log(np.exp(joint).sum(axis=1))
    np.subtract(joint, log_g[:, None], out=log_weights)
    np.minimum(log_wealth + log_g, LOG_CEILING, out=log_wealth)


class _KeyState:
    """The tracked lower caps of one key and their test states (rows).

    `admitted` is `log_wealth >= LOG_ADMIT` per row as Python bools, refreshed whenever the
    wealth changes (`track`, `refresh`): `admits` runs for several caps on every request,
    and reading a numpy scalar and comparing it cost more than the list lookup.
    """

    __slots__ = ("admitted", "caps", "index", "log_wealth", "log_weights")

    def __init__(self) -> None:
        self.caps: list[int] = []
        self.index: dict[int, int] = {}
        self.log_wealth = np.zeros(0)
        self.log_weights = np.zeros((0, COMPONENTS))
        self.admitted: list[bool] = []

    def refresh(self) -> None:
        """`admitted` from the wealth as it is now (after each change of `log_wealth`)."""
        self.admitted = (self.log_wealth >= LOG_ADMIT).tolist()

    def track(self, lower: int) -> int:
        row = len(self.caps)
        self.caps.append(lower)
        self.index[lower] = row
        self.log_wealth = np.append(self.log_wealth, 0.0)
        self.refresh()
        self.log_weights = np.vstack([self.log_weights, np.full((1, COMPONENTS), -math.log(COMPONENTS))])
        return row


class TruncationGuard:
    """Per (upstream, model, task, temperature, baseline cap): which lower caps are safe (module docstring).

    `max_extra_truncation` (δ) >= 1 switches the guard off (every cap admitted); 0 admits no
    lower cap at all. Lower caps are tracked from the first time they are asked about, at
    most `max_caps` per key.
    """

    def __init__(self, max_extra_truncation: float, *, max_keys: int = 4096, max_caps: int = 64) -> None:
        if not 0.0 <= max_extra_truncation:
            raise ValueError(f"max_extra_truncation must be >= 0, got {max_extra_truncation!r}")
        self.delta = max_extra_truncation
        self.max_keys = max_keys
        self.max_caps = max_caps
        self.keys: dict[TruncationKey, _KeyState] = {}
        self._q = components(self.delta) if 0.0 < self.delta < 1.0 else np.zeros(COMPONENTS)
        self._factors = log_factors(self._q, self.delta) if 0.0 < self.delta < 1.0 else None

    @property
    def off(self) -> bool:
        return self.delta >= 1.0

    def admits(self, key: TruncationKey, lower: int) -> bool:
        """May a cap of `lower` be sent where the baseline cap is key[4]? Starts tracking it if new."""
        if self.delta >= 1.0 or lower >= key[4]:  # `off`, without the property's call
            return True
        if self.delta <= 0.0:
            return False
        state = self.keys.get(key)
        if state is None:
            if len(self.keys) >= self.max_keys:
                return False
            state = self.keys[key] = _KeyState()
        row = state.index.get(lower)
        if row is None:
            if len(state.caps) >= self.max_caps:
                return False
            state.track(lower)
            return False
        return state.admitted[row]  # `log_wealth[row] >= LOG_ADMIT` (`_KeyState.refresh`)

    def observe(self, key: TruncationKey, sent_cap: int, tokens: int, cut: bool) -> None:
        """One finished answer of `key`: `tokens` generated under the cap `sent_cap`, `cut` if it hit it."""
        state = self.keys.get(key)
        if state is None or not state.caps or self.off or self.delta <= 0.0:
            return
        base = key[4]
        bad = np.fromiter((extra_cut(lower, base, sent_cap, tokens, cut) for lower in state.caps), dtype=bool, count=len(state.caps))
        try:
            wealth_step(state.log_wealth, state.log_weights, self._q, self.delta, bad, self._factors)
        finally:
            state.refresh()

    def observe_many(self, key: TruncationKey, sent_caps: Sequence[int], tokens: Sequence[int], cuts: Sequence[bool]) -> None:
        """`observe` for several answers of one key, in order: every indicator at once (one numpy pass), then a wealth step each."""
        state = self.keys.get(key)
        if state is None or not state.caps or self.off or self.delta <= 0.0:
            return
        base = key[4]
        lower = np.asarray(state.caps)
        sent = np.asarray(sent_caps)[:, None]
        n = np.asarray(tokens)[:, None]
        # `extra_cut` for every (answer, cap): a cut answer counts against every lower cap when it was cut below the baseline's.
        bad = np.where(np.asarray(cuts, dtype=bool)[:, None], sent < base, (lower < n) & (n <= base))
        try:
            for row in bad:
                wealth_step(state.log_wealth, state.log_weights, self._q, self.delta, row, self._factors)
        finally:
            state.refresh()

    def evidence(self, key: TruncationKey) -> dict[int, float]:
        """Per tracked lower cap, the test's wealth M_n (admitted at >= 1/ALPHA): for the control API and tests."""
        state = self.keys.get(key)
        if state is None:
            return {}
        return {cap: float(math.exp(w)) for cap, w in zip(state.caps, state.log_wealth)}
