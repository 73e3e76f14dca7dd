"""DynaDiag: dynamic sparse training of diagonally sparse networks, with real sparse kernels."""

from dynadiag.conv import DiagConv2d
from dynadiag.functional import num_active_diagonals, soft_topk_weights
from dynadiag.integrations.loop import AttachedMethod, attach
from dynadiag.layers import DiagLinear
from dynadiag.pretrained import from_pretrained, save_pretrained
from dynadiag.sparsify import DiagSparsifyConfig, densify_, sparsify_
from dynadiag.sparsity import SparsifyReport, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "AttachedMethod",
    "DiagConv2d",
    "DiagLinear",
    "DiagSparsifyConfig",
    "SparsifyReport",
    "attach",
    "densify_",
    "from_pretrained",
    "num_active_diagonals",
    "save_pretrained",
    "soft_topk_weights",
    "sparsify_",
    "sparsity_report",
]
