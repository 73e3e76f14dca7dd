"""Sparse-training methods the trainer can run (see :mod:`dynadiag.methods.base` for the hook interface)."""

from dynadiag.methods.base import SparseMethod
from dynadiag.methods.dynadiag import DynaDiagMethod
from dynadiag.methods.masks import MaskedMethod, MaskReport
from dynadiag.methods.rigl import RigLMethod
from dynadiag.methods.set import SETMethod
from dynadiag.methods.static import StaticMethod

__all__ = [
    "DynaDiagMethod",
    "MaskReport",
    "MaskedMethod",
    "RigLMethod",
    "SETMethod",
    "SparseMethod",
    "StaticMethod",
]
