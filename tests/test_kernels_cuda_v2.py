"""Host side of the v2 CUDA kernels on CPU: version switch, launch shapes, window sizes, cached plans.

The kernels themselves need a GPU (tests/test_kernels_cuda.py); here :func:`prepare` builds exactly what a launch
gets (plan and packed values) from CPU tensors, and the plan emulator runs it against the dense reference.
"""

import pytest
import torch

from dynadiag.functional import place_diagonals
from dynadiag.kernels import cuda_v2
from dynadiag.kernels.plan import emulate_apply


def _problem(in_f, out_f, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randperm(max(in_f, out_f), generator=gen)[:k].sort().values
    values = torch.randn(k, min(in_f, out_f), generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x, values, offsets


def test_kernel_version_defaults_to_v1_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(cuda_v2.KERNELS_ENV, raising=False)
    assert cuda_v2.kernel_version() == "v1"
    monkeypatch.setenv(cuda_v2.KERNELS_ENV, "V2")
    assert cuda_v2.kernel_version() == "v2"
    monkeypatch.setenv(cuda_v2.KERNELS_ENV, "v3")
    with pytest.raises(ValueError, match="v1' or 'v2"):
        cuda_v2.kernel_version()


def test_launch_shapes_and_window_sizes():
    assert cuda_v2.launch_shape(197, torch.float32) == cuda_v2.LaunchShape(128, 1, 4)  # batch-1 path
    assert cuda_v2.launch_shape(12608, torch.bfloat16) == cuda_v2.LaunchShape(128, 4, 1)
    assert cuda_v2.launch_shape(12608, torch.float64).tile == 64
    # H200: 227 KiB per block, 228 KiB per SM -> about 113 KiB per block for two blocks, two buffers.
    big = cuda_v2.window_limit(cuda_v2.LaunchShape(128, 4, 1), torch.float32, 227 * 1024, 228 * 1024)
    assert big == (113 * 1024) // 2 // ((32 + 4) * 4)
    small = cuda_v2.window_limit(cuda_v2.LaunchShape(128, 1, 4), torch.float32, 227 * 1024, 228 * 1024)
    assert small > big  # 8-token columns are narrower, even after the split-reduction buffer
    assert cuda_v2.window_limit(cuda_v2.LaunchShape(128, 4, 1), torch.float32, 1024, 1024) == 128


@pytest.mark.parametrize(("in_f", "out_f", "k", "n"), [(768, 768, 77, 5), (768, 768, 77, 2100), (768, 3072, 308, 3)])
def test_prepared_launch_computes_forward_and_grad_x(in_f, out_f, k, n):
    x, values, offsets = _problem(in_f, out_f, k, n)
    weight = place_diagonals(values, offsets, in_f, out_f)
    plan, vpack, shape = cuda_v2.prepare(x, values, offsets, out_f, tall=out_f >= in_f)
    assert shape == cuda_v2.launch_shape(n, x.dtype) and vpack.shape == (plan.shifts.numel(), shape.tile)
    assert torch.allclose(emulate_apply(x, vpack, plan), x @ weight.T, atol=1e-10)
    grad_y = torch.randn(n, out_f, dtype=torch.float64)
    plan_t, vpack_t, _ = cuda_v2.prepare(grad_y, values, offsets, in_f, tall=not out_f >= in_f)
    assert torch.allclose(emulate_apply(grad_y, vpack_t, plan_t), grad_y @ weight, atol=1e-10)


def test_plans_are_cached_per_offsets_version_and_checked():
    x, values, offsets = _problem(40, 40, 6, 3)
    first = cuda_v2.prepare(x, values, offsets, 40, tall=True)[0]
    assert cuda_v2.prepare(x, values * 2, offsets, 40, tall=True)[0] is first  # new values: same plan
    with torch.no_grad():
        offsets[0] = offsets[1]  # in-place: the version changes, the plan is rebuilt, and the offsets rechecked
    with pytest.raises(ValueError, match="strictly ascending"):
        cuda_v2.prepare(x, values, offsets, 40, tall=True)
