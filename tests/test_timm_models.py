"""Drop-in on timm architectures across families: sparsify with the default targets, train, freeze, check the exact
sparsity and that ``densify_`` gives back the same function (the check lives in ``scripts/timm_models.py``, which
also prints the supported-models table of docs/models.md)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import timm_models  # noqa: E402

CASES = [
    pytest.param(case, id=case.id.split(" ")[0], marks=[pytest.mark.slow] if case.slow else [])
    for case in timm_models.MODELS
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_at_least_fifteen_architectures_in_the_fast_suite():
    fast = [case for case in timm_models.MODELS if not case.slow]
    assert len(fast) >= 15 and len({case.family.split(" ")[0] for case in fast}) >= 15


@pytest.mark.parametrize("case", CASES)
def test_sparsify_train_freeze_densify(case):
    result = timm_models.check(case)
    assert result["converted"] > 0
    assert 0.85 < result["sparsity"] <= 0.901  # K = ceil(int(0.1 * in * out) / D): about 10 % kept, never less
