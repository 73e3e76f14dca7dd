"""The ``dense`` backend and the per-op dense/diagonal mix (``diag_linear_mixed``) against ``reference`` on CPU."""

import itertools
import shutil

import pytest
import torch

from dynadiag.kernels import get_backend
from dynadiag.kernels.dense import BACKEND, DiagOps, Plan, diag_linear_mixed, gather_weight, scatter_weight

SHAPES = [(48, 48, 5), (40, 112, 9), (112, 40, 9), (1, 37, 4), (37, 1, 4), (97, 131, 13), (53, 29, 53)]


def _problem(in_f, out_f, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64).to(dtype)
    return x, values, offsets


def _run(fn, x, values, grad_y):
    x, values = x.clone().requires_grad_(), values.clone().requires_grad_()
    y = fn(x, values)
    y.backward(grad_y)
    return y.detach(), x.grad, values.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("in_f", "out_f", "k"), SHAPES)
def test_scatter_and_gather_are_inverse_on_the_pattern(in_f, out_f, k):
    _, values, offsets = _problem(in_f, out_f, k, 1, torch.float64)
    weight = scatter_weight(values, offsets, in_f, out_f)
    ref = get_backend("reference").diag_linear(torch.eye(in_f, dtype=torch.float64), values, offsets, None, in_f, out_f)
    assert torch.equal(weight, ref.T)  # x = I gives W^T
    assert torch.equal(gather_weight(weight, offsets), values)


@pytest.mark.parametrize(("in_f", "out_f", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_backend_matches_reference(in_f, out_f, k, dtype):
    x, values, offsets = _problem(in_f, out_f, k, 11, dtype)
    bias = torch.randn(out_f, dtype=dtype)
    grad_y = torch.randn(11, out_f, dtype=dtype)
    ref = get_backend("reference")
    got = _run(lambda a, v: BACKEND.diag_linear(a, v, offsets, bias, in_f, out_f), x, values, grad_y)
    want = _run(lambda a, v: ref.diag_linear(a, v, offsets, bias, in_f, out_f), x, values, grad_y)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < tol


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the cpu ops")
@pytest.mark.parametrize("plan", [Plan(*p) for p in itertools.product(("diag", "dense"), repeat=3)], ids=str)
@pytest.mark.parametrize(("in_f", "out_f", "k"), [(40, 112, 9), (112, 40, 9), (97, 97, 13)])
def test_every_per_op_mix_matches_reference(plan, in_f, out_f, k):
    """Each op on either path (the diagonal ops here are the real CPU kernels) gives the same numbers."""
    from dynadiag.kernels.cpu import load_cpu_library

    load_cpu_library()
    dd = torch.ops.dynadiag
    diag_ops = DiagOps(dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v)
    x, values, offsets = _problem(in_f, out_f, k, 9, torch.float64)
    grad_y = torch.randn(9, out_f, dtype=torch.float64)
    ref = get_backend("reference")
    got = _run(lambda a, v: diag_linear_mixed(a, v, offsets, out_f, plan, diag_ops), x, values, grad_y)
    want = _run(lambda a, v: ref.diag_linear(a, v, offsets, None, in_f, out_f), x, values, grad_y)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-12


def test_mixed_plan_without_diag_ops_is_refused():
    x, values, offsets = _problem(8, 8, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="no diag_ops"):
        diag_linear_mixed(x, values, offsets, 8, Plan("diag", "dense", "dense"))
    assert str(Plan()) == "dense" and str(Plan("diag", "diag", "dense")) == "fwd=diag,dx=diag,dv=dense"
