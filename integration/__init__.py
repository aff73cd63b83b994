"""Integration of the suite's stages, and the exact LUNA16 evaluation.

The evaluation (FROC, CPM, bootstrap, candidate-stage mode) lives in
:mod:`integration.evaluation`, the paired comparison of submissions in
:mod:`integration.compare`; their public names are re-exported here.
"""

from integration.compare import (
    Comparison,
    PairedDifference,
    compare,
    compare_files,
    write_comparison,
)
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
    "Comparison",
    "EvaluationResult",
    "FrocCurve",
    "NoduleOutcomes",
    "PairedDifference",
    "candidate_sensitivity",
    "compare",
    "compare_files",
    "evaluate",
    "evaluate_files",
    "label_candidates",
    "plot_candidate_curve",
    "plot_froc",
    "write_comparison",
    "write_outputs",
]
