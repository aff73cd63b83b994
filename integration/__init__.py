"""Integration of the suite's stages, and the exact LUNA16 evaluation.

The evaluation (FROC, CPM, bootstrap, candidate-stage mode) lives in
:mod:`integration.evaluation`; its public names are re-exported here.
"""

from integration.evaluation import (
    FP_RATE_KEYS,
    FP_RATES,
    MAX_MARKS_PER_SCAN,
    BootstrapResult,
    CandidateStageResult,
    EvaluationResult,
    FrocCurve,
    NoduleOutcomes,
    candidate_sensitivity,
    evaluate,
    evaluate_files,
    label_candidates,
    plot_candidate_curve,
    plot_froc,
    write_outputs,
)

__all__ = [
    "FP_RATES",
    "FP_RATE_KEYS",
    "MAX_MARKS_PER_SCAN",
    "BootstrapResult",
    "CandidateStageResult",
    "EvaluationResult",
    "FrocCurve",
    "NoduleOutcomes",
    "candidate_sensitivity",
    "evaluate",
    "evaluate_files",
    "label_candidates",
    "plot_candidate_curve",
    "plot_froc",
    "write_outputs",
]
