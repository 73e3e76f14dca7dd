"""Post-training sparsification of a trained dense model: one-shot pruning (magnitude, Wanda, DSnoT) and
dense-to-diagonal conversion, plus the fixed-sparsity methods that fine-tune the result with the normal trainer."""

from dynadiag.prune.calibration import InputStats, calibration_batches, collect_input_stats, prune_layerwise_
from dynadiag.prune.diag import diag_scores, linear_to_diag
from dynadiag.prune.dsnot import DSnoTResult, dsnot_mask, expected_error
from dynadiag.prune.magnitude import magnitude_mask
from dynadiag.prune.masking import FixedDiagMethod, FixedMaskMethod, target_linears
from dynadiag.prune.pipeline import PRUNE_METHODS, PruneConfig, PruneReport, prune_model_
from dynadiag.prune.wanda import wanda_mask, wanda_scores

__all__ = [
    "PRUNE_METHODS",
    "DSnoTResult",
    "FixedDiagMethod",
    "FixedMaskMethod",
    "InputStats",
    "PruneConfig",
    "PruneReport",
    "calibration_batches",
    "collect_input_stats",
    "diag_scores",
    "dsnot_mask",
    "expected_error",
    "linear_to_diag",
    "magnitude_mask",
    "prune_layerwise_",
    "prune_model_",
    "target_linears",
    "wanda_mask",
    "wanda_scores",
]
