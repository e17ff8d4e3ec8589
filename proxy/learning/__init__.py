"""Learning across time and replicas: replica sync through Redis, promotion evidence from the log
(and the logged rows off-policy evaluation reads, which the control API's reports share),
the rollout's ticker, the offline evaluator, the judge, and the listeners that learn from an
answer (schema check, judge, regeneration).
"""

from __future__ import annotations

from proxy.learning.evaluate import PLOTS_MISSING, TrustRegion, evaluate_command, make_candidate
from proxy.learning.evidence import compute_ope_evidence, evidence_from_arrays
from proxy.learning.judge import Judge, JudgeMetrics, extract_answer, extract_pair, named_upstream_transport, upstream_transport
from proxy.learning.listeners import AnswerListener, AnswerValidator, BaselineRequest, JudgeCharge, KnobPatch
from proxy.learning.ope_rows import OpeArrays, Scored, load_rows, score_rows, score_rows_async
from proxy.learning.refresh import TableRefresher
from proxy.learning.signal_sync import SignalSync, SyncedQualitySignals, SyncedSignalBook
from proxy.learning.sync import SharedState
from proxy.learning.ticker import PolicyEpochs, RolloutTicker

__all__ = [
    "AnswerListener",
    "AnswerValidator",
    "BaselineRequest",
    "Judge",
    "JudgeCharge",
    "JudgeMetrics",
    "KnobPatch",
    "OpeArrays",
    "PLOTS_MISSING",
    "PolicyEpochs",
    "RolloutTicker",
    "Scored",
    "SharedState",
    "SignalSync",
    "SyncedQualitySignals",
    "SyncedSignalBook",
    "TableRefresher",
    "TrustRegion",
    "compute_ope_evidence",
    "evaluate_command",
    "evidence_from_arrays",
    "extract_answer",
    "extract_pair",
    "load_rows",
    "make_candidate",
    "named_upstream_transport",
    "score_rows",
    "score_rows_async",
    "upstream_transport",
]
