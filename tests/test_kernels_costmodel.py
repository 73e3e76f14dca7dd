"""``auto``'s cost model on CUDA: the choice logic, and the chosen mix computing the right numbers on CPU.

The choice is a function of the shape, token count, dtype and a device profile, so it is tested here with the
measured H200 prior and with made-up profiles (a device on which the diagonal kernels are fast). The compute
is not mocked: :class:`AutoBackend` runs the real CPU diagonal ops and real dense GEMMs on CPU tensors.
"""

import shutil
from dataclasses import replace

import pytest
import torch

from dynadiag import DiagLinear
from dynadiag.functional import num_active_diagonals
from dynadiag.kernels import get_backend
from dynadiag.kernels.costmodel import H200_PRIOR, AutoBackend, DeviceProfile, choose_plan, profile_for
from dynadiag.kernels.dense import DiagOps, Plan
from dynadiag.sparsity import kernel_summary, sparsity_report

VIT_B = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
FAST_DIAG = replace(H200_PRIOR, name="fake", diag={"apply_wide": 400.0, "apply_tall": 400.0, "sddmm": 400.0})
SLOW_DIAG = replace(H200_PRIOR, name="fake slow", diag_floor_ms=1.0)  # tiny test layers: launch floors dominate


@pytest.fixture
def strict_fp32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [197, 1576, 12608, 50432])
@pytest.mark.parametrize("training", [False, True])
def test_h200_prior_sends_16_bit_to_dense_everywhere(dtype, tokens, training):
    for in_f, out_f in VIT_B.values():
        k = num_active_diagonals(in_f, out_f, 0.9)
        assert choose_plan(in_f, out_f, k, tokens, dtype, training, H200_PRIOR).plan == Plan()


def test_h200_prior_sends_tf32_to_dense(strict_fp32):
    torch.set_float32_matmul_precision("high")  # TF32 allowed
    k = num_active_diagonals(768, 768, 0.9)
    assert choose_plan(768, 768, k, 12608, torch.float32, True, H200_PRIOR).plan == Plan()


def test_h200_prior_in_strict_fp32_keeps_the_measured_winners(strict_fp32):
    """Measured at 12,608 tokens: the v1 diagonal forward beat dense fp32 on proj and fc2, grad_V never did."""
    for name in ("proj", "fc2"):
        in_f, out_f = VIT_B[name]
        k = num_active_diagonals(in_f, out_f, 0.9)
        inference = choose_plan(in_f, out_f, k, 12608, torch.float32, False, H200_PRIOR)
        assert inference.plan.fwd == "diag" and inference.speedup_vs_dense > 1.0
        assert choose_plan(in_f, out_f, k, 12608, torch.float32, True, H200_PRIOR).plan.dv == "dense"
    in_f, out_f = VIT_B["proj"]
    assert choose_plan(in_f, out_f, 77, 12608, torch.float32, True, H200_PRIOR).plan == Plan("diag", "diag", "dense")
    # At 50 % sparsity (K = 384 of 768) dense fp32 wins even the forward.
    assert choose_plan(768, 768, 384, 12608, torch.float32, False, H200_PRIOR).plan.fwd == "dense"


def test_fast_diagonal_device_and_fp64_choose_the_diagonal_kernels(strict_fp32):
    assert choose_plan(768, 3072, 308, 12608, torch.bfloat16, True, FAST_DIAG).plan == Plan("diag", "diag", "diag")
    assert choose_plan(768, 3072, 3072, 12608, torch.float64, True, H200_PRIOR).plan == Plan("diag", "diag", "diag")


def test_profile_json_round_trip_and_env_override(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(FAST_DIAG.to_json())
    assert DeviceProfile.from_json(path.read_text()) == FAST_DIAG
    monkeypatch.setenv("DYNADIAG_COST_PROFILE", str(path))
    assert profile_for(torch.device("cpu")) == FAST_DIAG
    monkeypatch.delenv("DYNADIAG_COST_PROFILE")
    assert profile_for(torch.device("cpu")) == H200_PRIOR


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the cpu ops")
@pytest.mark.parametrize(
    ("profile", "dtype", "want"), [(FAST_DIAG, torch.float32, "cpu"), (SLOW_DIAG, torch.bfloat16, "dense")]
)
def test_auto_backend_runs_its_choice_and_the_layer_reports_it(profile, dtype, want, monkeypatch, strict_fp32):
    from dynadiag.kernels.cpu import load_cpu_library

    load_cpu_library()
    dd = torch.ops.dynadiag
    auto = AutoBackend("cpu", DiagOps(dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v), profile)
    torch.manual_seed(0)
    model = torch.nn.Sequential(DiagLinear(48, 96, sparsity=0.9), torch.nn.GELU(), DiagLinear(96, 48, sparsity=0.9))
    for layer in model:
        if isinstance(layer, DiagLinear):
            layer.freeze_()
    model = model.to(dtype)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    ref_y = model(x)  # backend "auto" on CPU: the cpu kernels
    ref_y.float().square().sum().backward()
    ref = (ref_y.detach(), x.grad.clone(), model[0].V.grad.clone())
    x.grad = None
    model.zero_grad()
    import dynadiag.layers

    monkeypatch.setattr(dynadiag.layers, "get_backend", lambda name, device: auto)
    y = model(x)
    y.float().square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, exp in zip((y.detach(), x.grad, model[0].V.grad), ref, strict=True):
        assert ((got.float() - exp.float()).norm() / exp.float().norm()).item() < tol
    assert model[0].kernel == want and model[2].kernel == want
    report = sparsity_report(model)
    assert [layer.kernel for layer in report.layers] == [want, want] and want in str(report)
    assert kernel_summary(model) == f"{want} x2"
    with torch.no_grad():
        model(x)
    assert model[0].kernel == want


def test_non_auto_backends_report_their_own_name():
    layer = DiagLinear(16, 16, sparsity=0.5, backend="reference").freeze_()
    assert layer.kernel == "" and "kernel" in str(sparsity_report(torch.nn.Sequential(layer)))
    layer(torch.randn(2, 16))
    assert layer.kernel == "reference"
    assert get_backend("dense").name == "dense"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the cpu ops")
def test_auto_backend_compiles_without_graph_breaks_across_token_counts(monkeypatch, strict_fp32):
    """torch.compile(fullgraph=True) traces the choice (symbolic token counts after the first recompile)."""
    from dynadiag.kernels.cpu import load_cpu_library

    load_cpu_library()
    dd = torch.ops.dynadiag
    mixed = replace(H200_PRIOR, diag={"apply_wide": 400.0, "apply_tall": 400.0, "sddmm": 0.001})
    auto = AutoBackend("cpu", DiagOps(dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v), mixed)
    import dynadiag.layers

    monkeypatch.setattr(dynadiag.layers, "get_backend", lambda name, device: auto)
    torch.manual_seed(0)
    model = torch.nn.Sequential(DiagLinear(32, 64, sparsity=0.75), torch.nn.GELU(), DiagLinear(64, 32, sparsity=0.75))
    for layer in model:
        if isinstance(layer, DiagLinear):
            layer.freeze_()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for n in (5, 7, 300):
        x = torch.randn(n, 32, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        grad = model[0].V.grad.clone()
        model.zero_grad()
        assert torch.allclose(y, model(x), atol=1e-5)
        model(x).sum().backward()
        assert torch.allclose(grad, model[0].V.grad, atol=1e-5)
        model.zero_grad()
        assert model[0].kernel == "fwd=cpu,dx=cpu,dv=dense"
