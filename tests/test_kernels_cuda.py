"""The ``cuda`` backend (csrc/cuda) against ``reference`` on a GPU. Run with ``pytest -m cuda``.

Shapes cover square, tall and wide layers, tails that are not multiples of the tiles, the "full row" and the
"windowed" shared-memory modes (fp32 rows wider than 768 columns are staged in windows), batch-1 token counts
(narrow tiles) and training token counts.
"""

import pytest
import torch

from dynadiag.functional import diag_index, num_active_diagonals, place_diagonals

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (in, out, K, N)
SHAPES = [
    (40, 40, 5, 11),
    (20, 48, 7, 9),
    (48, 20, 7, 9),
    (33, 70, 70, 64),  # every diagonal: the dense matrix
    (1000, 256, 60, 70),  # wide, windowed in fp32
    (256, 1000, 60, 70),  # tall, windowed in fp32
    (768, 768, 77, 197),  # ViT-B attn.proj at 90 %, batch-1 inference
    (768, 2304, 231, 197),  # attn.qkv
    (768, 3072, 308, 394),  # mlp.fc1
    (3072, 768, 308, 394),  # mlp.fc2
    (768, 3072, 1536, 1000),  # 50 %: many diagonals per window
    (3072, 768, 62, 4096),  # 98 %, training-sized token count
]


def _problem(in_f, out_f, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen, dtype=torch.float64) / k**0.5
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x.to(DEV, dtype), values.to(DEV, dtype), offsets.to(DEV)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _poisoned_call(fn, shape, dtype):
    """Fill the caching allocator's next block with NaN first, so unwritten outputs cannot pass."""
    poison = torch.full(shape, float("nan"), device=DEV, dtype=dtype)
    del poison
    return fn()


@pytest.fixture(scope="module")
def ops():
    from dynadiag.kernels import cuda

    cuda.load_cuda_library()
    return torch.ops.dynadiag


@pytest.mark.parametrize(("in_f", "out_f", "k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ops_match_dense_reference(ops, in_f, out_f, k, n, dtype):
    x, values, offsets = _problem(in_f, out_f, k, n, dtype)
    grad_y = torch.randn(n, out_f, device=DEV, dtype=torch.float64).to(dtype)
    dense = place_diagonals(values.double(), offsets, in_f, out_f)  # [out, in]
    rows, cols = diag_index(in_f, out_f, offsets)

    y = _poisoned_call(lambda: ops.diag_fwd(x, values, offsets, out_f), (n, out_f), dtype)
    gx = _poisoned_call(lambda: ops.diag_bwd_x(grad_y, values, offsets, in_f), (n, in_f), dtype)
    gv = ops.diag_bwd_v(grad_y, x, offsets)
    assert y.dtype == gx.dtype == gv.dtype == dtype
    assert gv.shape == values.shape
    tol = TOL[dtype]
    assert _rel(y, x.double() @ dense.T) < tol
    assert _rel(gx, grad_y.double() @ dense) < tol
    assert _rel(gv, (grad_y.double().T @ x.double())[rows, cols]) < tol


def test_backend_autograd_bias_and_leading_dims():
    from dynadiag.kernels import get_backend

    backend = get_backend("cuda", DEV)
    in_f, out_f, k = 384, 1536, 150
    x, values, offsets = _problem(in_f, out_f, k, 2 * 197, torch.float32)
    x = x.reshape(2, 197, in_f).requires_grad_()
    master = values.clone().requires_grad_()
    bias = torch.randn(out_f, device=DEV, requires_grad=True)
    y = backend.diag_linear(x, master, offsets, bias, in_f, out_f)
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().double().requires_grad_()
    v_ref = values.detach().double().requires_grad_()
    b_ref = bias.detach().double().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, place_diagonals(v_ref, offsets, in_f, out_f), b_ref)
    y_ref.backward(g.double())
    assert _rel(y, y_ref) < 1e-5
    assert _rel(x.grad, x_ref.grad) < 1e-5
    assert _rel(master.grad, v_ref.grad) < 1e-5
    assert _rel(bias.grad, b_ref.grad) < 1e-5


def test_bf16_activations_with_fp32_master_values():
    from dynadiag.kernels import get_backend

    backend = get_backend("cuda", DEV)
    x, values, offsets = _problem(768, 3072, 308, 256, torch.float32)
    master = values.clone().requires_grad_()
    y = backend.diag_linear(x.bfloat16(), master, offsets, None, 768, 3072)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert master.grad.dtype == torch.float32 and torch.isfinite(master.grad).all()


def test_gradcheck_fp64():
    from dynadiag.kernels import get_backend

    backend = get_backend("cuda", DEV)
    for in_f, out_f, k in [(7, 12, 3), (12, 7, 3), (9, 9, 4)]:
        x, values, offsets = _problem(in_f, out_f, k, 5, torch.float64)
        fn = lambda a, v, i=in_f, o=out_f, off=offsets: backend.diag_linear(a, v, off, None, i, o)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), values.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(ops, dtype):
    x, values, offsets = _problem(50, 90, 11, 13, dtype)
    grad_y = torch.randn(13, 90, device=DEV, dtype=dtype)
    torch.library.opcheck(ops.diag_fwd, (x, values.requires_grad_(), offsets, 90))
    torch.library.opcheck(ops.diag_bwd_x, (grad_y, values.detach(), offsets, 50))
    torch.library.opcheck(ops.diag_bwd_v, (grad_y, x, offsets))


def test_non_contiguous_inputs_and_side_stream(ops):
    x, values, offsets = _problem(256, 512, 40, 300, torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major storage
    assert not x_t.is_contiguous()
    expected = x.double() @ place_diagonals(values.double(), offsets, 256, 512).T
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = ops.diag_fwd(x_t, values, offsets, 512)
    torch.cuda.current_stream().wait_stream(stream)
    assert _rel(y, expected) < 1e-5


def test_token_count_beyond_one_grid(ops):
    """More token tiles than gridDim.y allows (65535): the launcher splits the launch."""
    n = 65535 * 32 + 1000
    x, values, offsets = _problem(16, 16, 3, n, torch.float32)
    y = ops.diag_fwd(x, values, offsets, 16)
    assert _rel(y, x.double() @ place_diagonals(values.double(), offsets, 16, 16).T) < 1e-5


def test_empty_and_input_validation(ops):
    x, values, offsets = _problem(32, 64, 4, 0, torch.float32)
    assert ops.diag_fwd(x, values, offsets, 64).shape == (0, 64)
    assert ops.diag_bwd_v(torch.zeros(0, 64, device=DEV), x, offsets).abs().sum() == 0
    x, values, offsets = _problem(32, 64, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        ops.diag_fwd(x, values.double(), offsets, 64)
    with pytest.raises(RuntimeError, match="columns"):
        ops.diag_fwd(x, values[:, :16], offsets, 64)
    with pytest.raises(RuntimeError, match="int64"):
        ops.diag_fwd(x, values, offsets.int(), 64)
    with pytest.raises(RuntimeError, match="offsets"):
        ops.diag_fwd(x, values, offsets[:3], 64)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.diag_fwd(x, values, offsets.cpu(), 64)
    # Unsorted, repeated or out-of-range offsets: one ValueError (checked on the host once per tensor version).
    with pytest.raises(ValueError, match=r"strictly ascending and in \[0, 64\)"):
        ops.diag_fwd(x, values, offsets.flip(0).contiguous(), 64)
    with pytest.raises(ValueError, match=r"strictly ascending and in \[0, 64\)"):
        ops.diag_bwd_v(torch.zeros(8, 64, device=DEV), x, torch.tensor([3, 3, 5, 9], device=DEV))
    with pytest.raises(ValueError, match=r"got offsets\[3\] = 64"):
        ops.diag_bwd_x(torch.zeros(8, 64, device=DEV), values, torch.tensor([0, 1, 2, 64], device=DEV), 32)
    good = offsets.clone()
    ops.diag_fwd(x, values, good, 64)  # checked once, then cached
    good[0] = 63  # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.diag_fwd(x, values, good, 64)


def test_auto_picks_cuda_and_layer_matches_reference():
    from dynadiag import DiagLinear
    from dynadiag.kernels import get_backend

    assert get_backend("auto", DEV).name == "cuda"
    torch.manual_seed(0)
    layer = DiagLinear(768, 3072, sparsity=0.9, backend="cuda").to(DEV)
    layer.freeze_()
    assert layer.k == num_active_diagonals(768, 3072, 0.9)
    x = torch.randn(4, 197, 768, device=DEV, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    grads = (x.grad.clone(), layer.V.grad.clone())
    x.grad = None
    layer.V.grad = None
    layer.backend = "reference"
    y_ref = layer(x)
    y_ref.square().mean().backward()
    assert _rel(y, y_ref) < 1e-5
    assert _rel(grads[0], x.grad) < 1e-5
    assert _rel(grads[1], layer.V.grad) < 1e-5


# ---- v2 kernels (csrc/cuda/diag_kernels_v2.cu; opt-in, DYNADIAG_CUDA_KERNELS=v2). These are their first
# hardware checks: the next GPU run must pass them before v2 can become the default.
V2_TOKENS = [5, 197, 2100]  # batch-1 path (<= 2048 tokens: 4-way diagonal split) and the 32-token tiles


@pytest.mark.parametrize(("in_f", "out_f", "k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_v2_ops_match_dense_reference(ops, in_f, out_f, k, n, dtype):
    from dynadiag.kernels import cuda_v2

    x, values, offsets = _problem(in_f, out_f, k, n, dtype)
    grad_y = torch.randn(n, out_f, device=DEV, dtype=torch.float64).to(dtype)
    dense = place_diagonals(values.double(), offsets, in_f, out_f)
    rows, cols = diag_index(in_f, out_f, offsets)
    fwd, bwd_x, bwd_v = cuda_v2.DIAG_OPS
    y = _poisoned_call(lambda: fwd(x, values, offsets, out_f), (n, out_f), dtype)
    gx = _poisoned_call(lambda: bwd_x(grad_y, values, offsets, in_f), (n, in_f), dtype)
    gv = bwd_v(grad_y, x, offsets)
    assert y.dtype == gx.dtype == gv.dtype == dtype and gv.shape == values.shape
    tol = TOL[dtype]
    assert _rel(y, x.double() @ dense.T) < tol
    assert _rel(gx, grad_y.double() @ dense) < tol
    assert _rel(gv, (grad_y.double().T @ x.double())[rows, cols]) < tol


@pytest.mark.parametrize("n", V2_TOKENS)
@pytest.mark.parametrize(("in_f", "out_f", "k"), [(768, 768, 77), (768, 3072, 308), (3072, 768, 308)])
def test_v2_vit_shapes_both_launch_paths(ops, in_f, out_f, k, n):
    from dynadiag.kernels import cuda_v2

    x, values, offsets = _problem(in_f, out_f, k, n, torch.float32)
    dense = place_diagonals(values.double(), offsets, in_f, out_f)
    assert _rel(cuda_v2.DIAG_OPS.fwd(x, values, offsets, out_f), x.double() @ dense.T) < 1e-5


def test_v2_grad_values_is_deterministic(ops):
    x, _values, offsets = _problem(768, 3072, 308, 12608, torch.float32)
    grad_y = torch.randn(12608, 3072, device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.diag_bwd_v_v2(grad_y, x, offsets)
        assert all(torch.equal(first, ops.diag_bwd_v_v2(grad_y, x, offsets)) for _ in range(3))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    ("in_f", "out_f", "k", "n", "dtype"),
    [
        (768, 3072, 308, 4096, torch.float64),  # fp64: v2 has no fp64 grad_V kernel
        (64, 16384, 64, 4096, torch.float32),  # rows too wide for v2's shared-memory window
        (200, 200, 40, 999, torch.float32),  # D % 128 != 0 with wide offset spans (the Q-window wrap)
    ],
)
def test_v2_grad_values_fallbacks_are_deterministic_and_right(ops, in_f, out_f, k, n, dtype):
    """Where v2's grad_V cannot run it takes v1's kernel in its deterministic mode (no atomics): bitwise repeats."""
    x, _values, offsets = _problem(in_f, out_f, k, n, dtype)
    grad_y = torch.randn(n, out_f, device=DEV, dtype=torch.float64).to(dtype)
    rows, cols = diag_index(in_f, out_f, offsets)
    first = ops.diag_bwd_v_v2(grad_y, x, offsets)
    assert all(torch.equal(first, ops.diag_bwd_v_v2(grad_y, x, offsets)) for _ in range(3))
    assert _rel(first, (grad_y.double().T @ x.double())[rows, cols]) < TOL[dtype]


def test_v1_grad_values_is_deterministic_when_asked(ops):
    """v1's grad_V uses atomics by default; under torch.use_deterministic_algorithms(True) it adds per-slice sums."""
    x, _values, offsets = _problem(768, 3072, 308, 12608, torch.float32)
    grad_y = torch.randn(12608, 3072, device=DEV)
    fast = ops.diag_bwd_v(grad_y, x, offsets)
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.diag_bwd_v(grad_y, x, offsets)
        assert all(torch.equal(first, ops.diag_bwd_v(grad_y, x, offsets)) for _ in range(3))
    finally:
        torch.use_deterministic_algorithms(False)
    assert _rel(first, fast) < 1e-5


def test_v2_backend_selected_by_env(monkeypatch):
    from dynadiag.kernels import get_backend

    monkeypatch.setenv("DYNADIAG_CUDA_KERNELS", "v2")
    backend = get_backend("cuda", DEV)
    x, values, offsets = _problem(384, 1536, 150, 394, torch.float32)
    x.requires_grad_()
    master = values.clone().requires_grad_()
    y = backend.diag_linear(x, master, offsets, None, 384, 1536)
    y.square().sum().backward()
    x_ref = x.detach().double().requires_grad_()
    v_ref = values.detach().double().requires_grad_()
    torch.nn.functional.linear(x_ref, place_diagonals(v_ref, offsets, 384, 1536)).square().sum().backward()
    assert _rel(x.grad, x_ref.grad) < 1e-5 and _rel(master.grad, v_ref.grad) < 1e-5
