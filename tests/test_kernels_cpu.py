"""CPU kernel backends against ``reference``: odd shapes, every gradient, fp32/bf16/fp64, layouts, build cache."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dynadiag import DiagLinear
from dynadiag.functional import place_diagonals
from dynadiag.kernels import available_backends, get_backend

if shutil.which(os.environ.get("CXX", "c++")) is None:  # pragma: no cover - every dev/CI machine has one
    pytest.skip("no C++ compiler: the cpu backend cannot be built here", allow_module_level=True)

# With a compiler the cpu backend must build; a build failure fails this test rather than skipping the rest.
# Triton on CPU is its (slow) interpreter, tested in test_kernels_triton.py.
BACKENDS = sorted(
    {"cpu", *(b for b in available_backends("cpu") if b not in ("reference", "triton") and not b.startswith("grouped"))}
)  # grouped_* backends (bf16/fp32 band tiles) have their own tests: test_kernels_grouped.py

# (in, out, K): square, tall, wide, 1-wide both ways, primes, a single diagonal, all diagonals (K = P), sizes that
# straddle the 64-wide register tiles and the wrap-around, and a ViT-B fc2-like wide layer.
SHAPES = [
    (48, 48, 5),
    (40, 112, 9),
    (112, 40, 9),
    (1, 37, 4),
    (37, 1, 4),
    (1, 1, 1),
    (97, 131, 13),
    (131, 97, 13),
    (70, 70, 1),
    (53, 29, 53),
    (29, 53, 53),
    (200, 136, 17),
    (384, 96, 24),
]


def _problem(in_f, out_f, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype)
    return x, values, offsets, bias


def _reference(x, values, offsets, bias, in_f, out_f, grad_y):
    """fp64 dense ground truth (on the same, possibly bf16-rounded, inputs) and its gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    backend = get_backend("reference")
    y = backend.diag_linear(leaves[0], leaves[1], offsets, leaves[2], in_f, out_f)
    y.backward(grad_y.double())
    return y, *(t.grad for t in leaves)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}


def _ran(cpu_variant, in_f, out_f):
    """The kernels a forced variant runs (avx512 hands P < 16 to portable) and those the last op ran."""
    isa = cpu_variant[0]
    want = "portable" if isa == "avx512" and max(in_f, out_f) < 16 else isa
    return want, torch.ops.dynadiag_cpu.last_run()


def _check_against_reference(backend, in_f, out_f, k, dtype):
    x, values, offsets, bias = _problem(in_f, out_f, k, n=13, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    y = get_backend(backend, "cpu").diag_linear(leaves[0], leaves[1], offsets, leaves[2], in_f, out_f)
    assert y.shape == (13, out_f) and y.dtype == dtype
    grad_y = torch.randn(13, out_f, dtype=torch.float64).to(dtype)
    y.backward(grad_y)
    ref = _reference(x, values, offsets, bias, in_f, out_f, grad_y)
    for name, got, want in zip(("y", "grad_x", "grad_values", "grad_bias"), (y, *(t.grad for t in leaves)), ref):
        assert got.dtype == dtype, name
        assert _rel(got, want) < TOL[dtype], f"{name}: rel err {_rel(got, want):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("in_f", "out_f", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match_reference(backend, in_f, out_f, k, dtype, cpu_variant):
    """Every CPU kernel variant (conftest.CPU_VARIANTS) on every shape, fp32 and bf16."""
    _check_against_reference(backend, in_f, out_f, k, dtype)
    if backend == "cpu":
        want, ran = _ran(cpu_variant, in_f, out_f)
        assert ran == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("in_f", "out_f", "k"), SHAPES)
def test_fp64_matches_reference(backend, in_f, out_f, k):
    """fp64 (gradcheck's dtype) takes the scalar loops whatever the variant."""
    _check_against_reference(backend, in_f, out_f, k, torch.float64)
    if backend == "cpu":
        assert torch.ops.dynadiag_cpu.last_run() == "scalar"


@pytest.mark.parametrize(("in_f", "out_f"), [(768, 2304), (3072, 768), (768, 768), (200, 648)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [21, 101])
def test_vit_shapes_with_many_tokens(in_f, out_f, dtype, n, cpu_variant):
    """Real layer sizes at 90 % sparsity: full register tiles, partial token blocks and every wrap position."""
    k = max(in_f, out_f) // 10
    x, values, offsets, bias = _problem(in_f, out_f, k, n=n, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    y = get_backend("cpu").diag_linear(leaves[0], leaves[1], offsets, leaves[2], in_f, out_f)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref = _reference(x, values, offsets, bias, in_f, out_f, grad_y)
    for got, want in zip((y, *(t.grad for t in leaves)), ref):
        assert _rel(got, want) < TOL[dtype]
    want, ran = _ran(cpu_variant, in_f, out_f)
    assert ran == want


def test_non_contiguous_and_3d_inputs():
    in_f, out_f, k = 40, 24, 6
    _, values, offsets, bias = _problem(in_f, out_f, k, n=1, dtype=torch.float32)
    base = torch.randn(2, 9, 2 * in_f)
    x = base[..., ::2]  # [2, 9, in], non-contiguous in the feature dimension
    assert not x.is_contiguous()
    backend = get_backend("cpu")
    y = backend.diag_linear(x, values, offsets, bias, in_f, out_f)
    assert y.shape == (2, 9, out_f)
    want = torch.nn.functional.linear(x, place_diagonals(values, offsets, in_f, out_f), bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    xt = torch.randn(in_f, 7).t()  # [7, in], transposed view
    torch.testing.assert_close(
        backend.diag_linear(xt, values, offsets, None, in_f, out_f),
        xt @ place_diagonals(values, offsets, in_f, out_f).T,
        rtol=1e-5,
        atol=1e-5,
    )


def test_fp32_master_values_under_bf16_activations():
    """Values stored in fp32 and bf16 activations: the kernel runs in bf16, gradients reach the fp32 values."""
    x, values, offsets, _ = _problem(64, 32, 8, n=5, dtype=torch.float32)
    values.requires_grad_()
    y = get_backend("cpu").diag_linear(x.bfloat16(), values, offsets, None, 64, 32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad is not None and values.grad.dtype == torch.float32


def test_frozen_layer_uses_cpu_backend_and_matches_dense():
    layer = DiagLinear(96, 160, sparsity=0.8, backend="cpu").freeze_()
    dense = layer.to_linear()
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert "cpu" in get_backend("auto", "cpu").candidates  # auto races the cpu kernels against dense GEMMs


def test_rejects_unsupported_inputs():
    backend = get_backend("cpu")
    x, values, offsets, _ = _problem(8, 8, 2, n=3, dtype=torch.float32)
    with pytest.raises(TypeError, match="supports"):
        backend.diag_linear(x.to(torch.int32), values, offsets, None, 8, 8)
    with pytest.raises(ValueError, match="input features"):
        backend.diag_linear(torch.randn(3, 9), values, offsets, None, 8, 8)
    ok, why = backend.is_available(torch.device("meta"))
    assert not ok and "CPU" in why


def test_build_cache_is_reused_without_recompiling(tmp_path):
    """A second process loads the cached library without invoking the compiler (cpp_extension.load)."""
    from dynadiag.kernels.cpu import load_cpu_library

    load_cpu_library()  # make sure the cache is populated for this cache root
    script = textwrap.dedent(
        """
        import time, torch.utils.cpp_extension as ce
        def _no_build(*a, **k):
            raise AssertionError("cpp_extension.load called: the build cache was not reused")
        ce.load = _no_build
        t = time.perf_counter()
        from dynadiag.kernels.cpu import load_cpu_library
        load_cpu_library()
        import torch
        x = torch.randn(2, 4)
        y = torch.ops.dynadiag.diag_fwd(x, torch.ones(1, 4), torch.zeros(1, dtype=torch.long), 4)
        assert torch.equal(y, x)
        print(f"{time.perf_counter() - t:.3f}")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_build_error_carries_compiler_message(tmp_path, monkeypatch):
    from dynadiag.kernels._build import ExtensionBuildError, load_extension

    monkeypatch.setenv("DYNADIAG_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.cpp"
    bad.write_text("int f() { return undefined_symbol_xyz; }\n")  # no torch headers: fails fast
    with pytest.raises(ExtensionBuildError, match="undefined_symbol_xyz"):
        load_extension("dynadiag_broken_test", [bad], extra_cflags=("-O0",), extra_ldflags=())


def test_build_failure_makes_backend_unavailable_with_the_message(monkeypatch):
    from dynadiag.kernels import cpu
    from dynadiag.kernels._build import ExtensionBuildError

    def broken():
        raise ExtensionBuildError("c++: error: something the compiler said")

    monkeypatch.setattr(cpu, "load_cpu_library", broken)
    ok, why = cpu.CpuBackend().is_available(torch.device("cpu"))
    assert not ok and "something the compiler said" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning only appears without a CUDA runtime")
def test_cpu_build_prints_no_cuda_runtime_warning():
    """A CPU-only machine with a CUDA toolkit on PATH: importing cpp_extension for a CPU build stays quiet."""
    script = "from dynadiag.kernels._build import _cpp_extension; _cpp_extension()"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUDA_HOME": "/usr/local"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No CUDA runtime" not in out.stderr
    # the same import without the guard does warn here, so the check above can fail
    plain = subprocess.run(
        [sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True, text=True, env=env, timeout=300
    )
    assert "No CUDA runtime" in plain.stderr


def test_kernel_sources_found_in_the_checkout():
    """An editable install or a checkout reads the repository's csrc/ (a wheel's copy is checked by make wheel-test)."""
    from dynadiag.kernels import ops

    assert Path(__file__).resolve().parents[1] / "csrc" == ops.CSRC
    assert (ops.CSRC / "schema.cpp").is_file() and list((ops.CSRC / "cpu").glob("*.cpp"))


def test_default_variant_is_the_best_the_cpu_runs(monkeypatch):
    from dynadiag.kernels.cpu import isa, supported_isas

    monkeypatch.delenv("DYNADIAG_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    supported = supported_isas()
    assert supported[-2:] == ["portable", "scalar"]
    assert isa() == next(s for s in supported if s != "amx")  # amx runs the avx512 kernels
    # The kernels' own CPU detection agrees with what torch reports.
    capability = torch.backends.cpu.get_cpu_capability()
    assert ("avx512" in supported) == capability.startswith("AVX512")
    assert ("avx2" in supported) == capability.startswith(("AVX2", "AVX512"))


@pytest.mark.parametrize("name", ["avx512", "avx2", "portable", "scalar"])
def test_forced_variant_runs_and_is_reported(name, monkeypatch):
    from dynadiag.kernels.cpu import isa, supported_isas

    if name not in supported_isas():
        pytest.skip(f"this CPU cannot run the {name} kernels")
    monkeypatch.setenv("DYNADIAG_CPU_ISA", name.upper())  # case does not matter
    assert isa() == name


def test_aten_cpu_capability_caps_the_default(monkeypatch):
    from dynadiag.kernels.cpu import isa, supported_isas

    monkeypatch.delenv("DYNADIAG_CPU_ISA", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert isa() == "portable"
    if "avx2" in supported_isas():
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        assert isa() == "avx2"


def test_unknown_or_unrunnable_variant_is_refused_with_one_line(monkeypatch):
    from dynadiag.kernels.cpu import CpuBackend, isa, supported_isas

    cases = [("avx1024", "is not a CPU kernel variant")]
    cases += [
        (n, f"this CPU cannot run the {n} kernels") for n in ("amx", "avx512", "avx2") if n not in supported_isas()
    ]
    x, values, offsets, _ = _problem(8, 8, 2, n=3, dtype=torch.float32)
    for name, message in cases:
        monkeypatch.setenv("DYNADIAG_CPU_ISA", name)
        with pytest.raises(ValueError, match=message) as info:
            isa()
        assert "\n" not in str(info.value) and f"DYNADIAG_CPU_ISA={name}" in str(info.value)
        with pytest.raises(ValueError, match=message):  # the ops refuse too, never falling back silently
            torch.ops.dynadiag.diag_fwd(x, values, offsets, 8)
        ok, why = CpuBackend().is_available(torch.device("cpu"))
        assert not ok and message in why


def test_one_cached_build_serves_every_cpu(monkeypatch):
    """No -march=native: the build folder (cache key) does not depend on the build machine's CPU flags."""
    from dynadiag.kernels import _build, cpu, ops

    sources = [ops.CSRC / "cpu" / f for f in cpu._SOURCES]
    here = _build.extension_dir("dynadiag_cpu", sources, cpu._CFLAGS)
    monkeypatch.setattr(_build, "_cpu_flags", lambda: "fpu sse sse2")  # an older CPU
    assert _build.extension_dir("dynadiag_cpu", sources, cpu._CFLAGS) == here
    assert sorted(cpu._SOURCES) == sorted(p.name for p in (ops.CSRC / "cpu").glob("*.cpp"))
