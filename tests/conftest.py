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
