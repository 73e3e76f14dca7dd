"""Grouped-diagonal band-tile kernels (``grouped_cpu``) against ``reference``: forward, grad_x, grad_values."""

import os
import shutil

import pytest
import torch

from dynadiag import DiagLinear
from dynadiag import groups as DG
from dynadiag.kernels import get_backend

if shutil.which(os.environ.get("CXX", "c++")) is None:  # pragma: no cover - every dev/CI machine has one
    pytest.skip("no C++ compiler: the grouped_cpu backend cannot be built here", allow_module_level=True)


def _grouped_cpu_or_skip():
    from dynadiag.kernels.grouped_cpu import BACKEND

    ok, why = BACKEND.is_available(torch.device("cpu"))
    if not ok and "brgemm" in why:
        pytest.skip(why)  # a CPU without AVX512-BF16/AMX: the backend says so instead of running slowly
    assert ok, why
    return BACKEND


# (in, out, group, kept groups): square, tall, wide, g not dividing P (short last group), runs that merge
# (neighbouring groups), runs longer than MAX_RUN, 1-wide layers.
CASES = [
    (64, 64, 4, 5),
    (64, 192, 8, 3),
    (192, 64, 8, 3),
    (100, 37, 3, 4),
    (37, 100, 3, 4),
    (48, 48, 32, 1),
    (96, 96, 16, 6),
    (160, 160, 1, 160),  # all diagonals: runs cut at MAX_RUN
    (1, 40, 2, 3),
    (40, 1, 2, 3),
    (768, 256, 32, 3),
]


def _problem(in_f, out_f, group, kept, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag = max(in_f, out_f)
    groups = torch.randperm(DG.num_groups(num_diag, group), generator=gen)[:kept]
    offsets = DG.group_offsets(groups, num_diag, group)
    values = torch.randn(offsets.numel(), min(in_f, out_f), generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype)
    return x, values, offsets, bias


def _check(backend, in_f, out_f, x, values, offsets, bias, atol, rtol):
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = backend.diag_linear(*leaves[:2], offsets, leaves[2], in_f, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    ref = get_backend("reference").diag_linear(*ref_leaves[:2], offsets, ref_leaves[2], in_f, out_f)
    ref.backward(grad_y.double())
    for name, got, want in zip(
        ("y", "grad_x", "grad_values", "grad_bias"),
        (y, *(t.grad for t in leaves)),
        (ref, *(t.grad for t in ref_leaves)),
        strict=True,
    ):
        scale = want.abs().max().clamp_min(1.0)
        err = (got.double() - want).abs().max() / scale
        assert err <= atol, f"{name}: max error {err:.3g} (relative to max |ref| {scale:.3g})"


@pytest.fixture(params=["amx", "brgemm"])
def bf16_path(request):
    """bf16 through the AMX tile kernel (where the CPU has AMX) and through oneDNN's brgemm path."""
    _grouped_cpu_or_skip()
    on_amx = torch.ops.dynadiag_grouped.use_amx(request.param == "amx")
    if request.param == "amx" and not on_amx:
        pytest.skip("no AMX on this CPU")
    yield request.param
    torch.ops.dynadiag_grouped.use_amx(True)


@pytest.mark.parametrize("in_f,out_f,group,kept", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_grouped_cpu_matches_reference(in_f, out_f, group, kept, dtype, tol, bf16_path):
    if dtype == torch.float32 and bf16_path == "amx":
        pytest.skip("fp32 has one path")
    backend = _grouped_cpu_or_skip()
    x, values, offsets, bias = _problem(in_f, out_f, group, kept, n=67, dtype=dtype)
    _check(backend, in_f, out_f, x, values, offsets, bias, tol, tol)


@pytest.mark.parametrize("in_f,out_f,n", [(192, 576, 300), (576, 192, 301), (160, 96, 129)])
def test_grouped_cpu_many_token_chunks(in_f, out_f, n, bf16_path):
    """More tokens than one grad_values chunk (128) and one token block (32), with partial ones at the end."""
    backend = _grouped_cpu_or_skip()
    x, values, offsets, bias = _problem(in_f, out_f, 32, 3, n=n, dtype=torch.bfloat16, seed=3)
    _check(backend, in_f, out_f, x, values, offsets, bias, 1.5e-2, 1.5e-2)


def test_grouped_cpu_any_offsets_and_empty_batch():
    backend = _grouped_cpu_or_skip()
    gen = torch.Generator().manual_seed(1)
    offsets = torch.randperm(131, generator=gen)[:13].sort().values  # single diagonals: runs of length ~1
    x = torch.randn(9, 97, generator=gen)
    values = torch.randn(13, 97, generator=gen)
    _check(backend, 97, 131, x, values, offsets, torch.zeros(131), 1e-5, 1e-5)
    assert backend.diag_linear(x[:0], values, offsets, None, 97, 131).shape == (0, 131)


def test_grouped_cpu_rejects_unsorted_offsets_and_other_dtypes():
    backend = _grouped_cpu_or_skip()
    x, values = torch.randn(4, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match="strictly ascending"):  # the one offsets error of every backend
        backend.diag_linear(x, values, torch.tensor([5, 2]), None, 16, 16)
    with pytest.raises(TypeError, match="supports"):
        backend.diag_linear(x.double(), values.double(), torch.tensor([2, 5]), None, 16, 16)


@pytest.mark.parametrize("permute", [False, True])
def test_grouped_layer_on_grouped_cpu(permute, bf16_path):
    """fp32 layer, fp32 and bf16 autocast (fp32 master values with bf16 activations) on both bf16 paths."""
    _grouped_cpu_or_skip()
    torch.manual_seed(0)
    layer = DiagLinear(64, 256, sparsity=0.9, group=8, permute=permute, backend="reference")
    with torch.no_grad():
        layer.alpha.normal_()
    layer.freeze_()
    fast = DiagLinear(64, 256, sparsity=0.9, group=8, backend="grouped_cpu")
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(5, 7, 64)
    assert torch.allclose(fast(x), layer(x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)  # trainable V: cast per call
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), layer(x), atol=5e-2, rtol=5e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)  # inference: the op gets the fp32 V (AMX: rounded into cached tiles; brgemm: cast in C++)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), layer(x), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("in_f,out_f", [(64, 192), (192, 64), (48, 48)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_fused_permutation_and_bias(in_f, out_f, dtype, tol):
    backend = _grouped_cpu_or_skip()
    x, values, offsets, bias = _problem(in_f, out_f, 8, 3, n=40, dtype=dtype)
    perm = DG.input_permutation(in_f, 0, "layer")
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = backend.diag_linear(leaves[0], leaves[1], offsets, leaves[2], in_f, out_f, perm=perm)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    ref = get_backend("reference").diag_linear(
        ref_leaves[0][:, perm], ref_leaves[1], offsets, ref_leaves[2], in_f, out_f
    )
    ref.backward(grad_y.double())
    for got, want in zip((y, *(t.grad for t in leaves)), (ref, *(t.grad for t in ref_leaves)), strict=True):
        assert (got.double() - want).abs().max() / want.abs().max().clamp_min(1.0) <= tol


def _amx_or_skip():
    _grouped_cpu_or_skip()
    if not torch.ops.dynadiag_grouped.use_amx(True):
        pytest.skip("no AMX on this CPU: the packed-tile cache belongs to the AMX path")


def test_amx_plan_cache_is_reused_and_never_stale():
    """Cached packed tiles are served only for the same, unwritten values/offsets tensors."""
    from dynadiag.kernels.grouped_cpu import clear_cache, grouped_apply

    _amx_or_skip()
    clear_cache()
    x, values, offsets, _ = _problem(96, 160, 16, 3, n=45, dtype=torch.bfloat16)
    ref = get_backend("reference")

    def expected(v):
        return ref.diag_linear(x.double(), v.double(), offsets, None, 96, 160)

    def close(y, v):
        return (y.double() - expected(v)).abs().max() <= 1.5e-2 * expected(v).abs().max()

    y1 = grouped_apply(x, values, offsets, 160, True, cache=True)
    assert torch.ops.dynadiag_grouped.cache_size() == 1 and close(y1, values)
    assert torch.equal(grouped_apply(x, values, offsets, 160, True, cache=True), y1)  # served from the cache
    assert torch.ops.dynadiag_grouped.cache_size() == 1
    with torch.no_grad():
        values.mul_(-2.0)  # an in-place write (as an optimizer step): the version counter moves
    y2 = grouped_apply(x, values, offsets, 160, True, cache=True)
    assert close(y2, values) and not torch.equal(y2, y1)
    assert torch.ops.dynadiag_grouped.cache_size() == 1  # the stale entry was replaced
    with torch.no_grad():
        values[0].zero_()  # through a view: same version counter
    assert close(grouped_apply(x, values, offsets, 160, True, cache=True), values)
    # A different tensor with equal contents at another address, and temporaries that die: no unbounded growth.
    for _ in range(5):
        assert close(grouped_apply(x, values.clone(), offsets, 160, True, cache=True), values)
    assert torch.ops.dynadiag_grouped.cache_size() <= 2
    assert clear_cache() >= 1 and torch.ops.dynadiag_grouped.cache_size() == 0


@pytest.mark.parametrize("weights", ["bf16", "fp32_autocast"])
def test_grouped_layer_cache_follows_optimizer_steps(weights):
    """A frozen layer evaluated under no_grad (cached tiles), trained one step, evaluated again: new weights. With
    fp32 weights under bf16 autocast the cache is keyed on the fp32 V itself."""
    import contextlib

    from dynadiag.kernels.grouped_cpu import clear_cache

    _amx_or_skip()
    clear_cache()
    torch.manual_seed(0)
    layer = DiagLinear(128, 384, sparsity=0.8, group=16, permute=True, backend="grouped_cpu")
    with torch.no_grad():
        layer.alpha.normal_()
    layer.freeze_()
    if weights == "bf16":
        layer = layer.bfloat16()
        x, amp = torch.randn(3, 50, 128, dtype=torch.bfloat16), contextlib.nullcontext
    else:
        x, amp = torch.randn(3, 50, 128), lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)

    def reference_output():  # bf16-rounded weights and input, exact arithmetic
        twin = DiagLinear(128, 384, sparsity=0.8, group=16, permute=True, backend="reference")
        twin.freeze_()
        state = layer.state_dict()
        twin.load_state_dict({k: v.bfloat16().double() if v.is_floating_point() else v for k, v in state.items()})
        return twin.double()(x.bfloat16().double())

    for _ in range(2):
        with torch.no_grad(), amp():
            y = layer(x)
        want = reference_output()
        assert y.dtype == torch.bfloat16 and (y.double() - want).abs().max() <= 2e-2 * want.abs().max()
        assert torch.ops.dynadiag_grouped.cache_size() == 1
        with amp():
            layer(x).float().square().mean().backward()  # training forward: not cached
        opt.step()
        opt.zero_grad()
    with torch.inference_mode(), amp():
        y = layer(x)
    want = reference_output()
    assert (y.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_cache_only_for_weights_not_being_trained(monkeypatch):
    """Inference (no_grad) caches; a training forward and ``CACHE_FROZEN = False`` do not."""
    from dynadiag.kernels import grouped_cpu

    _amx_or_skip()
    grouped_cpu.clear_cache()
    x, values, offsets, _ = _problem(64, 192, 8, 3, n=20, dtype=torch.bfloat16)
    values.requires_grad_()
    grouped_cpu.BACKEND.diag_linear(x, values, offsets, None, 64, 192)  # grad enabled, trainable values
    assert torch.ops.dynadiag_grouped.cache_size() == 0
    monkeypatch.setattr(grouped_cpu, "CACHE_FROZEN", False)
    with torch.no_grad():
        grouped_cpu.BACKEND.diag_linear(x, values, offsets, None, 64, 192)
    assert torch.ops.dynadiag_grouped.cache_size() == 0
    monkeypatch.setattr(grouped_cpu, "CACHE_FROZEN", True)
    with torch.no_grad():
        grouped_cpu.BACKEND.diag_linear(x, values, offsets, None, 64, 192)
    assert torch.ops.dynadiag_grouped.cache_size() == 1
    grouped_cpu.clear_cache()
