import os
import tempfile

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated and the backend registry caches availability, so
# the interpreter switch must be on before any test module touches the registry (CPU-only machines, e.g. CI).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# auto's measured choices go to a per-session folder: tests neither read a user's cache nor leave entries in it.
os.environ.setdefault("DYNADIAG_AUTOTUNE_CACHE", tempfile.mkdtemp(prefix="dynadiag-autotune-"))
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CPU kernel variants (dynadiag.kernels.cpu) and, for avx512 and avx2, both gather/scatter layouts: every variant
# this CPU can run is checked against the reference, so an AVX-512 machine tests the avx2 and portable kernels too.
CPU_VARIANTS = [
    ("avx512", "auto"),
    ("avx512", "tm"),
    ("avx512", "fm"),
    ("avx2", "auto"),
    ("avx2", "tm"),
    ("avx2", "fm"),
    ("portable", "auto"),
    ("scalar", "auto"),
]


@pytest.fixture(params=CPU_VARIANTS, ids=lambda p: p[0] if p[1] == "auto" else f"{p[0]}-{p[1]}")
def cpu_variant(request, monkeypatch):
    """Force one CPU kernel variant (``DYNADIAG_CPU_ISA``) and layout (``DYNADIAG_CPU_LAYOUT``) for the test."""
    from dynadiag.kernels.cpu import supported_isas

    isa, layout = request.param
    if isa not in supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setenv("DYNADIAG_CPU_ISA", isa)
    if layout != "auto":
        monkeypatch.setenv("DYNADIAG_CPU_LAYOUT", layout)
    return request.param
