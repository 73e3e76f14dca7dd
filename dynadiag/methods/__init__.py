"""Sparse-training methods the trainer can run (see :mod:`dynadiag.methods.base` for the hook interface)."""

from dynadiag.methods.base import SparseMethod
from dynadiag.methods.dynadiag import DynaDiagMethod

__all__ = ["DynaDiagMethod", "SparseMethod"]
