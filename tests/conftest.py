import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated and the backend registry caches availability, so
# the interpreter switch must be on before any test module touches the registry (CPU-only machines, e.g. CI).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
