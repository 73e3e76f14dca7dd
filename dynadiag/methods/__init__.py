"""Sparse-training methods the trainer can run (see :mod:`dynadiag.methods.base` for the hook interface)."""

from dynadiag.methods.base import SparseMethod
from dynadiag.methods.diag_heur import DiagHeurMethod
from dynadiag.methods.dynadiag import DynaDiagMethod
from dynadiag.methods.gmp import GMPMethod
from dynadiag.methods.masks import MaskedMethod, MaskReport, MaskSparsifyConfig
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.methods.rigl import RigLMethod
from dynadiag.methods.set import SETMethod
from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod
from dynadiag.methods.srigl import SRigLMethod
from dynadiag.methods.static import StaticMethod

__all__ = [
    "DiagHeurMethod",
    "DynaDiagMethod",
    "GMPMethod",
    "MaskReport",
    "MaskSparsifyConfig",
    "MaskedMethod",
    "RegrowSchedule",
    "RigLMethod",
    "SETMethod",
    "SRigLMethod",
    "SparseDynaDiagMethod",
    "SparseMethod",
    "StaticMethod",
]
