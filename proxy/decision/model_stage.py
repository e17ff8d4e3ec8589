"""The model as a knob: which model serves a request, on evidence that sees quality.

A request for a model whose `[[upstreams.models_config]]` entry declares `substitutes` may
be served by one of them (the arm space's `options`). The model is the first stage of the
draw (`proxy.decision.sampler.TwoStageSampler`), so the logged propensity stays an exact
product: P(arm) = P(model) · P(temperature | model) · P(cap, effort | model, temperature).

Evidence before traffic. Like temperature, models are compared only on signals that see
quality (trusted judge scores and explicit feedback; the automatic score cannot tell a
smaller model's weaker answer from a good one). Per task type, each stand-in's judged and
explicit quality is set against the requested model's (every request it served: holdout
and tuned alike) with the anytime-valid confidence sequences the guards use
(`policies.sequences.Comparison`, α split over the kinds), so looking after every signal
inflates nothing:

- *exploring* until then: the stand-in gets `exploration_share` of the task's tuned traffic;
- *proven* once a kind shows it surely no worse than (1 − `[slo] max_quality_regression`)
  times the requested model (`sequences.non_inferior`) and no kind shows it worse: it
  competes on the policy's signal-only statistics (`~model`), and when it is also cheaper
  (its input + output price below the requested model's) it takes the requested model's
  place, which keeps `exploration_share` so the comparison goes on;
- *worse* once a kind shows it surely more than that margin worse (`sequences.verdict`):
  it is offered no more for the task (`ModelEvidence.admits`).

The evidence survives a restart: `ModelEvidenceKeeper` saves the whole of it as one blob
in the state store (the embedded store under `data_dir`, or Redis) after each change, one
save in flight, and loads it at start-up, as the conservative monitor does with its state;
a stand-in shown worse stays off, a proven one keeps its place. The per-task rollback, the cost guard and promotion
see tuned traffic, stand-ins included, exactly as for the other knobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

import msgspec

from guards.state import StateStore, StoreUnavailable
from policies import sequences
from policies.records import Arm, RequestContext

log = logging.getLogger("thermostat")

MODEL_EVIDENCE_KEY = "model:evidence"
"""State-store key of the saved evidence (`ModelEvidenceKeeper`)."""

MODEL_STATISTICS = "~model"
"""Suffix of the task type under which the policy keeps its model-stage statistics (signal rewards only)."""

MODEL_KINDS = ("judge", "explicit")
"""Signal kinds that compare models (pointwise quality; the pairwise verdict is against the baseline's answer)."""

ModelStatus = Literal["exploring", "proven", "worse"]


def model_context(ctx: RequestContext) -> RequestContext:
    """The context of the model stage's statistics (like `sampler.temperature_context`)."""
    return msgspec.structs.replace(ctx, task_type=ctx.task_type + MODEL_STATISTICS)


def model_arm(model: str | None, base: Arm) -> Arm:
    """A model's arm in the model-stage statistics: the requested baseline's knobs stand for every arm of it."""
    return Arm(temperature=base.temperature, max_tokens=base.max_tokens, effort=base.effort, model=model)


class ModelStageSettings(msgspec.Struct, frozen=True):
    """How much a stand-in may carry before it is shown no worse, and how much worse is too much."""

    exploration_share: float = 0.05
    max_quality_regression: float = 0.05
    alpha: float = 0.05


class ModelEvidenceState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What is saved: every stream's sequence as (task type, stand-in or "" for the requested model, kind, sequence)."""

    streams: list[tuple[str, str, str, sequences.MeanSequence]] = []


class ModelEvidence:
    """Per task type, each stand-in's quality signals against the requested model's (module docstring)."""

    def __init__(self, settings: ModelStageSettings, max_task_types: int = 4096) -> None:
        self.settings = settings
        self.max_task_types = max_task_types
        self._alpha = settings.alpha / len(MODEL_KINDS)
        # (task, model or "" for the requested one, kind) -> the stream's sequence
        self._streams: dict[tuple[str, str, str], sequences.MeanSequence] = {}
        self._tasks: set[str] = set()
        self._status: dict[tuple[str, str], ModelStatus] = {}
        self._stand_ins: dict[str, set[str]] = {}  # task -> stand-ins seen with a signal
        # (ctx, stand-in) -> is it cheaper than the requested model; set by the decider (prices)
        self.cheaper: Callable[[RequestContext, str], bool] = lambda _ctx, _model: False
        self.on_change: Callable[[], None] | None = None  # the keeper's save (`ModelEvidenceKeeper`)

    def observe(self, task_type: str, model: str | None, kind: str, quality: float, *, trusted: bool = True) -> None:
        """One delayed signal of a request served by `model` (None: the requested model)."""
        if not trusted or kind not in MODEL_KINDS or not 0.0 <= quality <= 1.0:
            return
        if task_type not in self._tasks:
            if len(self._tasks) >= self.max_task_types:
                return
            self._tasks.add(task_type)
        key = (task_type, model or "", kind)
        seq = self._streams.get(key)
        if seq is None:
            seq = sequences.new_sequence(self._alpha / 2.0)
        self._streams[key] = sequences.observe(seq, quality)
        if model is not None:
            self._stand_ins.setdefault(task_type, set()).add(model)
        for m in self._stand_ins.get(task_type, ()) if model is None else (model,):
            self._status[(task_type, m)] = self._judge(task_type, m)
        if self.on_change is not None:
            self.on_change()

    def snapshot(self) -> ModelEvidenceState:
        return ModelEvidenceState(streams=[(task, model, kind, seq) for (task, model, kind), seq in self._streams.items()])

    def restore(self, state: ModelEvidenceState) -> None:
        """Take a saved state in place of this one; the statuses are judged again from its sequences."""
        self._streams, self._tasks, self._stand_ins, self._status = {}, set(), {}, {}
        for task, model, kind, seq in state.streams:
            if task not in self._tasks and len(self._tasks) >= self.max_task_types:
                continue
            self._tasks.add(task)
            self._streams[(task, model, kind)] = seq
            if model:
                self._stand_ins.setdefault(task, set()).add(model)
        for task, models in self._stand_ins.items():
            for m in models:
                self._status[(task, m)] = self._judge(task, m)

    def comparison(self, task_type: str, model: str, kind: str) -> sequences.Comparison:
        """The stand-in (`optimised`) against the requested model (`holdout`) on one kind."""
        empty = sequences.new_sequence(self._alpha / 2.0)
        return sequences.Comparison(
            optimised=self._streams.get((task_type, model, kind), empty), holdout=self._streams.get((task_type, "", kind), empty),
        )

    def _judge(self, task_type: str, model: str) -> ModelStatus:
        margin = self.settings.max_quality_regression
        comparisons = [self.comparison(task_type, model, kind) for kind in MODEL_KINDS]
        if any(sequences.verdict(c, margin) == "worse" for c in comparisons):
            return "worse"
        return "proven" if any(sequences.non_inferior(c, margin) for c in comparisons) else "exploring"

    def status(self, task_type: str, model: str) -> ModelStatus:
        return self._status.get((task_type, model), "exploring")

    def admits(self, task_type: str, model: str) -> bool:
        """May the stand-in be offered for the task (not shown worse)?"""
        return self.status(task_type, model) != "worse"

    def report(self) -> list[dict[str, object]]:
        """Per task and stand-in: its status and, per kind, both means' anytime-valid bounds and signal counts (`GET slo-status`)."""
        out: list[dict[str, object]] = []
        for (task, model), status in sorted(self._status.items()):
            kinds = []
            for kind in MODEL_KINDS:
                c = self.comparison(task, model, kind)
                kinds.append({
                    "kind": kind, "stand_in_n": c.optimised.n, "requested_n": c.holdout.n,
                    "stand_in_bounds": sequences.bounds(c.optimised), "requested_bounds": sequences.bounds(c.holdout),
                })
            out.append({"task_type": task, "model": model, "status": status, "kinds": kinds})
        return out

    def shares(self, ctx: RequestContext, models: list[str | None], propensities: Callable[[list[int]], list[float]]) -> list[float]:
        """P(model) over `models` (the requested model first, None): the model stage of the draw.

        Exploring stand-ins get `exploration_share` each (at most half the traffic together
        with the requested model's share below). Proven stand-ins that are cheaper take the
        requested model's place, which keeps the same exploration share; otherwise the requested
        model and the proven stand-ins split the rest by the policy's signal-only statistics
        (`propensities(indices)`).
        """
        eps = self.settings.exploration_share
        status = ["requested" if m is None else self.status(ctx.task_type, m) for m in models]
        explore = [j for j, s in enumerate(status) if s == "exploring"]
        preferred = [j for j, s in enumerate(status) if s == "proven" and self.cheaper(ctx, models[j] or "")]
        each = min(eps, 0.5 / max(1, len(explore) + (1 if preferred else 0)))
        out = [0.0] * len(models)
        for j in explore:
            out[j] = each
        if preferred:
            out[0] = each
            rest = preferred
        else:
            rest = [j for j, s in enumerate(status) if s in ("requested", "proven")]
        mass = 1.0 - sum(out)
        if len(rest) == 1:
            out[rest[0]] += mass
        else:
            for j, p in zip(rest, propensities(rest), strict=True):
                out[j] += mass * float(p)
        return out


class ModelEvidenceKeeper:
    """Saves `ModelEvidence` to the state store after each change and loads it at start-up.

    One save in flight at a time, and one more if anything changed meanwhile: the blob is
    the whole state, so the last save carries every earlier change."""

    def __init__(self, evidence: ModelEvidence, state_store: StateStore) -> None:
        self.evidence = evidence
        self.state_store = state_store
        self._save: asyncio.Task[None] | None = None
        self._dirty = False
        evidence.on_change = self._changed

    async def load(self) -> None:
        try:
            raw = await self.state_store.get(MODEL_EVIDENCE_KEY)
        except StoreUnavailable:
            log.warning("state store unreachable at start-up; the model stage's evidence starts empty (stand-ins explore again)")
            return
        if raw is None:
            return
        try:
            self.evidence.restore(msgspec.json.decode(raw, type=ModelEvidenceState))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # an older layout: start over rather than fail start-up
            log.warning("stored model-stage evidence ignored: %s", exc)

    def _changed(self) -> None:
        if self._save is not None and not self._save.done():
            self._dirty = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # offline (`thermostat evaluate`): nothing to save to
            return
        self._dirty = False
        self._save = loop.create_task(self._write())

    async def _write(self) -> None:
        while True:
            try:
                await self.state_store.set(MODEL_EVIDENCE_KEY, msgspec.json.encode(self.evidence.snapshot()))
            except Exception as exc:  # noqa: BLE001 - the next change saves again
                log.warning("saving the model stage's evidence failed: %s", exc)
                return
            if not self._dirty:
                return
            self._dirty = False

    async def flush(self) -> None:
        """Wait for the save in flight (shutdown, tests)."""
        if self._save is not None:
            await asyncio.gather(self._save, return_exceptions=True)
