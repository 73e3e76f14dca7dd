"""The ``torch.ops.dynadiag`` custom ops: opcheck, fp64 gradcheck, fake shapes, errors, torch.compile."""

import shutil

import pytest
import torch

from dynadiag import DiagLinear
from dynadiag.functional import place_diagonals

if shutil.which("c++") is None:  # pragma: no cover
    pytest.skip("no C++ compiler: the dynadiag ops cannot be built here", allow_module_level=True)

from dynadiag.kernels import ops
from dynadiag.kernels.cpu import load_cpu_library

load_cpu_library()
OPS = torch.ops.dynadiag


def _args(in_f, out_f, k, n=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen).to(dtype)
    x = torch.randn(n, in_f, generator=gen).to(dtype)
    grad_y = torch.randn(n, out_f, generator=gen).to(dtype)
    return x, values, offsets, grad_y


OPCHECK_SHAPES = [(12, 20, 3), (20, 12, 3), (16, 16, 16), (40, 72, 5)]


def _opcheck(in_f, out_f, k, dtype, n):
    x, values, offsets, grad_y = _args(in_f, out_f, k, n=n, dtype=dtype)
    torch.library.opcheck(OPS.diag_fwd.default, (x.requires_grad_(), values.requires_grad_(), offsets, out_f))
    bias = torch.randn(out_f, dtype=dtype, requires_grad=True)
    torch.library.opcheck(OPS.diag_fwd_bias.default, (x, values, offsets, out_f, bias))
    torch.library.opcheck(OPS.diag_bwd_x.default, (grad_y, values.detach(), offsets, in_f))
    torch.library.opcheck(OPS.diag_bwd_v.default, (grad_y, x.detach(), offsets))


@pytest.mark.parametrize(("in_f", "out_f", "k"), OPCHECK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(in_f, out_f, k, dtype, cpu_variant):
    """Every CPU kernel variant (conftest.CPU_VARIANTS), fp32 and bf16."""
    _opcheck(in_f, out_f, k, dtype, n=6 if cpu_variant[1] == "tm" else 53)


@pytest.mark.parametrize(("in_f", "out_f", "k"), OPCHECK_SHAPES)
def test_opcheck_fp64(in_f, out_f, k):
    """fp64 takes the scalar loops whatever the variant."""
    _opcheck(in_f, out_f, k, torch.float64, n=6)


@pytest.mark.parametrize(("in_f", "out_f", "k"), [(7, 11, 3), (11, 7, 3), (9, 9, 9), (1, 5, 2), (5, 1, 5)])
def test_gradcheck_fp64_through_the_op(in_f, out_f, k):
    x, values, offsets, _ = _args(in_f, out_f, k, n=4, dtype=torch.float64)
    x.requires_grad_()
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: OPS.diag_fwd(a, v, offsets, out_f), (x, values))
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v, b: OPS.diag_fwd_bias(a, v, offsets, out_f, b), (x, values, bias))


@pytest.mark.parametrize(("in_f", "out_f"), [(24, 56), (56, 24), (33, 33)])
def test_ops_match_dense_formulas(in_f, out_f):
    x, values, offsets, grad_y = _args(in_f, out_f, 7, dtype=torch.float64)
    weight = place_diagonals(values, offsets, in_f, out_f)  # [out, in]
    torch.testing.assert_close(OPS.diag_fwd(x, values, offsets, out_f), x @ weight.T)
    torch.testing.assert_close(OPS.diag_bwd_x(grad_y, values, offsets, in_f), grad_y @ weight)
    # dW = grad_y^T x [out, in], read back on each kept diagonal: element t of diagonal p is W[(t + p) % out, t]
    # when out >= in, else W[t, (t + p) % in] (the layout spelled out here, independently of dynadiag.functional)
    full = grad_y.T @ x
    length = min(in_f, out_f)
    t = torch.arange(length)
    expected = torch.stack(
        [full[(t + p) % out_f, t] if out_f >= in_f else full[t, (t + p) % in_f] for p in offsets.tolist()]
    )
    torch.testing.assert_close(OPS.diag_bwd_v(grad_y, x, offsets), expected)


def test_only_requested_gradients_are_computed():
    x, values, offsets, _ = _args(10, 14, 3)
    values.requires_grad_()
    y = OPS.diag_fwd(x, values, offsets, 14)
    (gv,) = torch.autograd.grad(y.sum(), values)
    assert gv.shape == values.shape and x.grad is None


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, values = torch.empty(5, 30), torch.empty(4, 18)
        offsets = torch.zeros(4, dtype=torch.long)
        assert OPS.diag_fwd(x, values, offsets, 18).shape == (5, 18)
        assert OPS.diag_bwd_x(torch.empty(5, 18), values, offsets, 30).shape == (5, 30)
        assert OPS.diag_bwd_v(torch.empty(5, 18), x, offsets).shape == (4, 18)


def test_errors_are_clear():
    x, values, offsets, _ = _args(8, 12, 3)
    with pytest.raises(ValueError, match=r"diag_fwd: offsets must be strictly ascending and in \[0, 12\), got offsets"):
        OPS.diag_fwd(x, values, torch.tensor([0, 5, 12]), 12)
    # Numbers in messages are formatted without an ostream (csrc/dd_check.h) and must still read right.
    with pytest.raises(RuntimeError, match=r"values must have min\(in, out\) = 8 columns, got 5"):
        OPS.diag_fwd(x, values[:, :5], offsets, 12)
    with pytest.raises(RuntimeError, match=r"3 diagonals but 2 offsets"):
        OPS.diag_fwd(x, values, offsets[:2], 12)
    with pytest.raises(RuntimeError, match=r"dtype mismatch \(Double vs Float\)"):
        OPS.diag_fwd(x.double(), values, offsets, 12)
    with pytest.raises(RuntimeError, match="offsets"):
        OPS.diag_fwd(x, values, offsets.int(), 12)
    with pytest.raises(RuntimeError, match=r"must be positive, got -3 and 8"):
        OPS.diag_bwd_x(torch.randn(2, 8), values[:, :0], offsets, -3)


BAD_OFFSETS = {
    "unsorted": ([5, 0, 2], r"got offsets\[0\] = 5 then offsets\[1\] = 0"),
    "repeated": ([2, 2, 5], r"got offsets\[0\] = 2 then offsets\[1\] = 2"),
    "too large": ([0, 5, 12], r"got offsets\[2\] = 12"),
    "negative": ([-1, 2, 3], r"got offsets\[0\] = -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_OFFSETS))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "dense"])
def test_every_backend_rejects_bad_offsets_with_one_error(backend, case):
    """Unsorted or repeated offsets used to be accepted (the CUDA kernels then silently dropped diagonals)."""
    import importlib

    module = importlib.import_module(f"dynadiag.kernels.{backend}")  # the backend object, even where it cannot run
    x, values, _, _ = _args(8, 12, 3)
    bad, detail = BAD_OFFSETS[case]
    pattern = rf"offsets must be strictly ascending and in \[0, 12\), {detail}"
    with pytest.raises(ValueError, match=pattern):
        module.BACKEND.diag_linear(x, values, torch.tensor(bad), None, 8, 12)
    for op, args in [
        ("diag_bwd_x", (torch.randn(6, 12), values, torch.tensor(bad), 8)),
        ("diag_bwd_v", (torch.randn(6, 12), x, torch.tensor(bad))),
    ]:
        with pytest.raises(ValueError, match=pattern):
            getattr(OPS, op)(*args)


def test_no_torch_check_streams_its_arguments():
    """Every TORCH_CHECK in csrc has at most one C-string message; the others go through DD_CHECK.

    On the H200 test machine a failing TORCH_CHECK whose message streamed an int64 segfaulted the process
    (docs/benchmarks/gpu/h200-quick-50365c8/gpu_check.log); DD_CHECK (csrc/dd_check.h) never builds an ostream.
    """
    import re

    offenders = []
    for path in sorted(ops.CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh") or path.name == "dd_check.h":
            continue
        text = path.read_text()
        for match in re.finditer(r"\bTORCH_CHECK\w*\(", text):
            depth, i, args, start = 1, match.end(), [], match.end()
            while depth:
                ch = text[i]
                if ch == '"':
                    i = text.index('"', i + 1)
                elif ch in "([{":
                    depth += 1
                elif ch in ")]}":
                    depth -= 1
                elif ch == "," and depth == 1:
                    args.append(text[start:i].strip())
                    start = i + 1
                i += 1
            args.append(text[start : i - 1].strip())
            message = args[1:]
            if len(message) > 1 or (message and not re.fullmatch(r'("[^"]*"\s*)+', message[0])):
                offenders.append(f"{path.relative_to(ops.CSRC)}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not offenders, f"TORCH_CHECK with streamed arguments (use DD_CHECK): {offenders}"


def test_empty_batch():
    x, values, offsets, _ = _args(8, 12, 3, n=0)
    assert OPS.diag_fwd(x, values, offsets, 12).shape == (0, 12)
    assert OPS.diag_bwd_v(torch.empty(0, 12), x, offsets).abs().sum() == 0


def _frozen_model():
    model = torch.nn.Sequential(
        DiagLinear(32, 64, sparsity=0.75, backend="cpu"),
        torch.nn.GELU(),
        DiagLinear(64, 32, sparsity=0.75, backend="cpu"),
    )
    for layer in model:
        if isinstance(layer, DiagLinear):
            layer.freeze_()
    return model


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_frozen_model_without_graph_breaks(compile_backend):
    torch._dynamo.reset()
    model = _frozen_model()
    x = torch.randn(3, 7, 32, requires_grad=True)
    model(x)  # the backend registry imports backends lazily on first use; dynamo cannot trace that import
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)  # fullgraph: a break raises
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()  # aot_eager traces the registered autograd formula through the fake kernels
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    explanation = torch._dynamo.explain(model)(torch.randn(2, 32))
    assert explanation.graph_break_count == 0


@pytest.mark.slow
def test_inductor_compile_frozen_model():
    torch._dynamo.reset()
    model = _frozen_model()
    x = torch.randn(4, 32)
    model(x)  # registry warm-up, as above
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)
