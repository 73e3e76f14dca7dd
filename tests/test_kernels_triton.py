"""The ``triton`` backend against ``reference``: compiled on a GPU, in Triton's interpreter on CPU (CI)."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are decorated (lazily, on first launch); without a GPU the tests run
# the interpreter, with one they run the compiled kernels.
_ON_GPU = torch.cuda.is_available()
if not _ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from dynadiag.functional import diag_index, place_diagonals  # noqa: E402
from dynadiag.kernels import get_backend  # noqa: E402
from dynadiag.kernels import triton as triton_backend  # noqa: E402

DEVICE = torch.device("cuda" if _ON_GPU else "cpu")
BACKEND = triton_backend.BACKEND

# (in, out, K): square, tall (out > in), wide (out < in), a single diagonal, every diagonal, and sizes that are
# not multiples of the block sizes so that tails and wrap-around are exercised.
SHAPES = [(40, 40, 5), (20, 48, 7), (48, 20, 7), (33, 70, 1), (45, 23, 45), (64, 64, 64), (100, 37, 9)]


def _problem(in_f, out_f, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), values.to(DEVICE, dtype), offsets.to(DEVICE)


def _reference(x, values, offsets, in_f, out_f, grad_y):
    x = x.detach().double().requires_grad_()
    values = values.detach().double().requires_grad_()
    y = torch.nn.functional.linear(x, place_diagonals(values, offsets, in_f, out_f))
    y.backward(grad_y.double())
    return y, x.grad, values.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_availability_follows_device_and_interpreter():
    ok, why = BACKEND.is_available(DEVICE)
    assert ok, why
    if not _ON_GPU:
        ok, why = BACKEND.is_available(torch.device("cuda"))
        assert not ok and why


@pytest.mark.parametrize(("in_f", "out_f", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_reference(in_f, out_f, k, dtype):
    x, values, offsets = _problem(in_f, out_f, k, n=37, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = BACKEND.diag_linear(x, values, offsets, None, in_f, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_y, ref_gx, ref_gv = _reference(x, values, offsets, in_f, out_f, grad_y)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.shape == (37, out_f) and y.dtype == dtype
    assert _rel(y, ref_y) < tol
    assert _rel(x.grad, ref_gx) < tol
    assert _rel(values.grad, ref_gv) < tol


def test_primitives_directly():
    """apply in both forms and sddmm, each against a dense formula written out from the index map."""
    in_f, out_f, k = 24, 56, 6
    x, values, offsets = _problem(in_f, out_f, k, n=11, dtype=torch.float64)
    dense = place_diagonals(values, offsets, in_f, out_f)  # [out, in]
    y = triton_backend.diag_apply(x, values, offsets, out_f, tall=True)
    torch.testing.assert_close(y, x @ dense.T)
    g = torch.randn(11, out_f, dtype=torch.float64, device=DEVICE)
    gx = triton_backend.diag_apply(g, values, offsets, in_f, tall=False)
    torch.testing.assert_close(gx, g @ dense)
    rows, cols = diag_index(in_f, out_f, offsets)
    torch.testing.assert_close(triton_backend.diag_sddmm(x, g, offsets), (g.T @ x)[rows, cols])


def test_bias_leading_dims_and_mixed_precision_values():
    in_f, out_f, k = 32, 48, 4
    x, values, offsets = _problem(in_f, out_f, k, n=6, dtype=torch.float32)
    bias = torch.randn(out_f, device=DEVICE, requires_grad=True)
    x3 = x.reshape(2, 3, in_f)
    v64 = values.double().requires_grad_()  # master weights in another dtype: the cast is differentiable
    y = BACKEND.diag_linear(x3, v64, offsets, bias, in_f, out_f)
    assert y.shape == (2, 3, out_f) and y.dtype == torch.float32
    ref = torch.nn.functional.linear(x3, place_diagonals(values, offsets, in_f, out_f), bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert v64.grad is not None and v64.grad.dtype == torch.float64
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 6.0))


def test_empty_batch():
    x, values, offsets = _problem(16, 16, 3, n=0, dtype=torch.float32)
    y = BACKEND.diag_linear(x, values, offsets, None, 16, 16)
    assert y.shape == (0, 16)


def test_gradcheck_fp64():
    in_f, out_f, k = 5, 8, 2
    x, values, offsets = _problem(in_f, out_f, k, n=2, dtype=torch.float64)
    x.requires_grad_()
    values.requires_grad_()
    fn = lambda a, v: BACKEND.diag_linear(a, v, offsets, None, in_f, out_f)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values))


@pytest.mark.parametrize(("in_f", "out_f", "k"), [(5, 8, 2), (8, 5, 3)])  # tall and wide
def test_custom_ops_pass_opcheck(in_f, out_f, k):
    """The Triton kernels are registered custom ops (schema, fake kernel, autograd), like the C++ ones."""
    x, values, offsets = _problem(in_f, out_f, k, n=3, dtype=torch.float64)
    grad_y = torch.randn(3, out_f, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.dynadiag.triton_fwd, (x.requires_grad_(), values.requires_grad_(), offsets, out_f))
    torch.library.opcheck(torch.ops.dynadiag.triton_bwd_x, (grad_y, values.detach(), offsets, in_f))
    torch.library.opcheck(torch.ops.dynadiag.triton_bwd_v, (grad_y, x.detach(), offsets))


def test_registry_returns_triton_when_asked():
    assert get_backend("triton", DEVICE) is BACKEND


@pytest.mark.cuda
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("in_f", "out_f", "k"), [(768, 2304, 231), (3072, 768, 308), (768, 768, 77)])
def test_half_precision_vit_shapes_on_gpu(in_f, out_f, k, dtype):
    x, values, offsets = _problem(in_f, out_f, k, n=197, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = BACKEND.diag_linear(x, values, offsets, None, in_f, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_y, ref_gx, ref_gv = _reference(x, values, offsets, in_f, out_f, grad_y)
    assert _rel(y, ref_y) < 1e-2
    assert _rel(x.grad, ref_gx) < 1e-2
    assert _rel(values.grad, ref_gv) < 1e-2
