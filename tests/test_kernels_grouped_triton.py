"""``grouped_triton`` (``tl.dot`` band tiles) against ``reference``: compiled on a GPU, interpreted on CPU (CI).

In Triton's interpreter ``tl.dot`` on bf16 is wrong, so the CPU runs check fp32; a GPU run also checks bf16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_ON_GPU = torch.cuda.is_available()
if not _ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (lazily, on first launch)

triton = pytest.importorskip("triton")

from dynadiag import DiagLinear  # noqa: E402
from dynadiag import groups as DG  # noqa: E402
from dynadiag.functional import place_diagonals  # noqa: E402
from dynadiag.kernels import get_backend, tile_plan  # noqa: E402
from dynadiag.kernels import grouped_triton as GT  # noqa: E402

DEVICE = torch.device("cuda" if _ON_GPU else "cpu")
BACKEND = GT.BACKEND
DTYPES = [torch.float32] + ([torch.bfloat16] if _ON_GPU else [])

# (in, out, group, kept groups): tall, wide, square, short last group, neighbouring groups merging, long runs.
CASES = [
    (40, 96, 8, 3),
    (96, 40, 8, 3),
    (64, 64, 4, 5),
    (37, 100, 3, 4),
    (100, 37, 3, 4),
    (48, 48, 32, 1),
    (70, 70, 1, 70),
]


def _problem(in_f, out_f, group, kept, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag = max(in_f, out_f)
    groups = torch.randperm(DG.num_groups(num_diag, group), generator=gen)[:kept]
    offsets = DG.group_offsets(groups, num_diag, group)
    values = torch.randn(offsets.numel(), min(in_f, out_f), generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), values.to(DEVICE, dtype), offsets.to(DEVICE)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("in_f", "out_f", "group", "kept"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_grad_x_grad_values_match_reference(in_f, out_f, group, kept, dtype):
    ok, why = BACKEND.is_available(DEVICE)
    assert ok, why
    x, values, offsets = _problem(in_f, out_f, group, kept, n=45, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = BACKEND.diag_linear(x, values, offsets, None, in_f, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    xr = x.detach().double().requires_grad_()
    vr = values.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(xr, place_diagonals(vr, offsets, in_f, out_f))
    ref.backward(grad_y.double())
    # fp32 on a GPU runs tl.dot in TF32 (10-bit mantissa), bf16 has 8 bits; the interpreter computes in fp32.
    tol = 1e-5 if not _ON_GPU else (5e-3 if dtype == torch.float32 else 2e-2)
    assert y.shape == (45, out_f) and y.dtype == dtype
    assert _rel(y, ref) < tol, "forward"
    assert _rel(x.grad, xr.grad) < tol, "grad_x"
    assert _rel(values.grad, vr.grad) < tol, "grad_values"


@pytest.mark.parametrize(("in_f", "out_f"), [(40, 96), (96, 40), (64, 64), (37, 100)])
def test_tile_plans_hold_every_weight_once_and_only_occupied_steps(in_f, out_f):
    """Unpacking the forward tiles gives W, the grad_x tiles W^T; every step holds a kept weight."""
    _, values, offsets = _problem(in_f, out_f, 8, 3, n=1, dtype=torch.float64)
    weight = place_diagonals(values, offsets, in_f, out_f)
    for plan, want in zip(GT.plans(offsets, in_f, out_f), (weight, weight.T), strict=True):
        tiles = tile_plan.pack_tiles(values, plan, torch.float64)  # [S, BK, R]
        dense = torch.zeros(plan.B, plan.A + plan.BK, dtype=torch.float64, device=DEVICE)
        for s in range(plan.steps):
            b, c0 = int(plan.step_block[s]), int(plan.step_col[s])
            rows = slice(b * plan.R, min(plan.B, (b + 1) * plan.R))
            dense[rows, c0 : c0 + plan.BK] += tiles[s, :, : rows.stop - rows.start].T
            assert (tiles[s] != 0).any(), "a step without kept weights"
        assert torch.equal(dense[:, : plan.A], want) and not dense[:, plan.A :].any()
        assert plan.block_ptr[-1] == plan.steps
        assert (plan.step_col % GT.ALIGN == 0).all()  # 16-byte vector loads of the activations


def test_grouped_steps_are_not_padded_to_powers_of_two():
    """g = 32 at 90 %: a band of 32 diagonals over 32 rows spans 63 columns = 2 steps of 32 per row block and run,
    fewer where neighbouring runs overlap; runs merged to 64 take 3 steps, not a 128-wide window (4)."""
    in_f, out_f, group = 768, 3072, 32
    for kept in (10, 24):
        _, values, offsets = _problem(in_f, out_f, group, kept, n=1, dtype=torch.float32)
        fwd, _ = GT.plans(offsets, in_f, out_f)
        steps_per_block = (fwd.block_ptr[1:] - fwd.block_ptr[:-1]).float()
        runs = len(DG.offset_runs(offsets.cpu()))
        assert steps_per_block.max() <= 2 * runs
        # Density of the computed tiles: about g / (g + 31) of every step is a kept weight, not g / 128.
        density = values.numel() / (fwd.steps * fwd.BK * fwd.R)
        assert density > 0.45, density


def test_plans_are_built_once_per_offsets_tensor():
    _, _, offsets = _problem(64, 64, 4, 5, n=1, dtype=torch.float32)
    BACKEND.prepare(offsets, 64, 64)
    first = GT.plans(offsets, 64, 64)
    assert GT.plans(offsets, 64, 64) is first  # no rebuild, no host read
    with torch.no_grad():
        offsets[-1] = offsets[-1]  # an in-place write bumps the version: the plan is rebuilt
    assert GT.plans(offsets, 64, 64) is not first


def test_grouped_layer_on_grouped_triton():
    torch.manual_seed(0)
    layer = DiagLinear(32, 96, sparsity=0.8, group=8, permute=True, backend="reference").to(DEVICE)
    with torch.no_grad():
        layer.alpha.normal_()
    layer.freeze_()
    fast = DiagLinear(32, 96, sparsity=0.8, group=8, backend="grouped_triton").to(DEVICE)
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 32, device=DEVICE)
    assert _rel(fast(x), layer(x)) < (1e-5 if not _ON_GPU else 5e-3)
    assert get_backend("grouped_triton", DEVICE) is BACKEND


@pytest.mark.parametrize("offsets", [[4, 2, 9], [1, 1, 5], [0, 3, 40]])
def test_bad_offsets_are_one_clear_error(offsets):
    """Unsorted, repeated or out-of-range offsets would silently drop diagonals in the band tiles."""
    x, values, _ = _problem(40, 40, 1, 3, n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="strictly ascending and in"):
        BACKEND.diag_linear(x, values, torch.tensor(offsets, device=DEVICE), None, 40, 40)


def test_diag_ops_have_the_op_signatures():
    """``DIAG_OPS`` (auto's per-op candidate) computes forward, grad_x and grad_values on its own."""
    from dynadiag.functional import diag_index

    x, values, offsets = _problem(96, 40, 8, 3, n=9, dtype=torch.float32)
    weight = place_diagonals(values.double(), offsets, 96, 40)
    grad_y = torch.randn(9, 40, device=DEVICE)
    rows, cols = diag_index(96, 40, offsets)
    tol = 1e-5 if not _ON_GPU else 5e-3
    checks = (
        (GT.DIAG_OPS.fwd(x, values, offsets, 40), x.double() @ weight.T),
        (GT.DIAG_OPS.bwd_x(grad_y, values, offsets, 96), grad_y.double() @ weight),
        (GT.DIAG_OPS.bwd_v(grad_y, x, offsets), (grad_y.double().T @ x.double())[rows, cols]),
    )
    for got, want in checks:
        assert _rel(got, want) < tol


_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dynadiag.kernels import grouped_triton as GT

ARGS = {
    "apply": {"src": "D", "tiles": "D", "step_col": "*i32", "block_ptr": "*i32", "dst": "D", "N": "i32", "A": "i32",
              "B": "i32"},
    "grad": {"x": "D", "gy": "D", "step_col": "*i32", "step_block": "*i32", "scratch": "*fp32", "N": "i32",
             "A": "i32", "B": "i32", "S": "i32", "per_slice": "i32"},
}
found = []
for kernel, dtype, ieee, arch in json.loads(sys.argv[1]):
    fn = triton.jit(getattr(GT, "_apply_kernel" if kernel == "apply" else "_grad_kernel"))
    consts = {"BLOCK_N": 64, "R": GT.ROWS, "BK": GT.BLOCK_K, "IEEE": ieee, "ALIGN": GT.ALIGN}
    sig = {a: ("*" + dtype if t == "D" else t) for a, t in ARGS[kernel].items()} | dict.fromkeys(consts, "constexpr")
    # As a launch specializes them for ViT widths: pointers and feature counts divisible by 16.
    wide = [a for a, t in sig.items() if t != "constexpr" and a not in ("N", "S", "per_slice")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in wide}
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32))
    ptx = compiled.asm["ptx"]
    found.append({"wgmma": "wgmma" in ptx, "mma": "mma" in ptx, "tf32": ".tf32" in ptx,
                  "scalar_16bit_loads": len(re.findall(r"ld\.global(\.\w+)*\.b16", ptx)),
                  "cp_async": "cp.async" in ptx, "cubin": len(compiled.asm["cubin"])})
print(json.dumps(found))
"""


def test_kernels_compile_for_gpus_without_one(tmp_path):
    """Triton compiles both kernels to PTX and cubin for sm_80 / sm_90 on a machine without a GPU, and the PTX shows
    where the products run. A separate process: once ``triton.language`` is imported under ``TRITON_INTERPRET=1``
    (as in this test session), Triton's own helpers are interpreted and cannot be compiled."""
    cases = [
        ("apply", "bf16", False, 90),  # Hopper: warpgroup MMAs
        ("grad", "bf16", False, 90),
        ("apply", "fp16", False, 80),  # Ampere: mma.sync
        ("apply", "fp32", False, 80),  # fp32 under "high" matmul precision: TF32 tensor cores
        ("apply", "fp32", True, 80),  # "highest": full fp32 on CUDA cores, no MMA
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile here rather than load another process's cache entries
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16_90, grad_90, fp16_80, tf32_80, ieee_80 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(c["cubin"] > 0 for c in (bf16_90, grad_90, fp16_80, tf32_80, ieee_80))
    assert bf16_90["wgmma"] and grad_90["mma"] and fp16_80["mma"]
    # Aligned steps: the activations stream into shared memory as cp.async vectors, no element-wise 16-bit loads.
    for case in (bf16_90, grad_90, fp16_80):
        assert case["cp_async"] and case["scalar_16bit_loads"] == 0, case
    assert tf32_80["mma"] and tf32_80["tf32"]
    assert not ieee_80["mma"]
