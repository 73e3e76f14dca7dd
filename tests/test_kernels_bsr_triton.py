"""``bsr_triton`` (torch's BSR matmul on the layer's aligned blocks) against ``reference``.

On CPU the same plans run through torch's CPU BSR matmul and a batched block product (fp64 here); a GPU run checks
the Triton kernels (``bsr_dense_mm``, ``sampled_addmm``) in fp32 and bf16.
"""

import pytest
import torch

from dynadiag import groups as DG
from dynadiag.functional import place_diagonals
from dynadiag.kernels import bsr_triton as BT
from dynadiag.kernels import get_backend

_ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if _ON_GPU else "cpu")


def _problem(in_f, out_f, group, kept, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag = max(in_f, out_f)
    groups = torch.randperm(DG.num_groups(num_diag, group), generator=gen)[:kept]
    offsets = DG.group_offsets(groups, num_diag, group)
    values = torch.randn(offsets.numel(), min(in_f, out_f), generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), values.to(DEVICE, dtype), offsets.to(DEVICE)


@pytest.mark.parametrize(("in_f", "out_f", "group", "kept"), [(64, 96, 8, 3), (96, 64, 8, 3), (70, 70, 1, 9)])
def test_forward_and_gradients_match_reference(in_f, out_f, group, kept):
    dtype = torch.float32 if _ON_GPU else torch.float64
    x, values, offsets = _problem(in_f, out_f, group, kept, n=21, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = BT.diag_linear_bsr(x, values, offsets, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    xr = x.detach().double().requires_grad_()
    vr = values.detach().double().requires_grad_()
    ref = xr @ place_diagonals(vr, offsets, in_f, out_f).T
    ref.backward(grad_y.double())
    tol = 1e-10 if dtype == torch.float64 else 5e-3
    for got, want in ((y, ref), (x.grad, xr.grad), (values.grad, vr.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol


def test_blocks_are_aligned_and_only_occupied():
    _, values, offsets = _problem(96, 64, 8, 2, n=1, dtype=torch.float64)
    fwd, bwd = BT.plans(offsets, 96, 64)
    for plan in (fwd, bwd):
        assert (plan.step_col % BT.BLOCK == 0).all()
        blocks = BT._bsr(values, plan, torch.float64).values()
        assert (blocks.flatten(1) != 0).any(1).all()


def test_backend_is_cuda_only_and_registered():
    ok, why = BT.BACKEND.is_available(torch.device("cpu"))
    assert not ok and "CUDA" in why
    if _ON_GPU:
        assert get_backend("bsr_triton", DEVICE) is BT.BACKEND


def test_diag_ops_have_the_op_signatures():
    """``DIAG_OPS`` (auto's per-op candidate) computes forward, grad_x and grad_values on its own."""
    x, values, offsets = _problem(64, 96, 8, 3, n=7, dtype=torch.float32 if _ON_GPU else torch.float64)
    weight = place_diagonals(values.double(), offsets, 64, 96)
    grad_y = torch.randn(7, 96, dtype=x.dtype, device=DEVICE)
    from dynadiag.functional import diag_index

    rows, cols = diag_index(64, 96, offsets)
    tol = 1e-10 if not _ON_GPU else 5e-3
    checks = (
        (BT.DIAG_OPS.fwd(x, values, offsets, 96), x.double() @ weight.T),
        (BT.DIAG_OPS.bwd_x(grad_y, values, offsets, 64), grad_y.double() @ weight),
        (BT.DIAG_OPS.bwd_v(grad_y, x, offsets), (grad_y.double().T @ x.double())[rows, cols]),
    )
    for got, want in checks:
        assert ((got.double() - want).norm() / want.norm()).item() < tol
