"""``auto``'s measured choice (:mod:`dynadiag.kernels.autotune`, :mod:`dynadiag.kernels.auto`) and the ``dense``
path priced as ``nn.Linear``: the choice logic on given and on real timings, the cache file, the switch."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from dynadiag import DiagLinear
from dynadiag.kernels import autotune, get_backend
from dynadiag.kernels.auto import AutoBackend, for_device, mean_run
from dynadiag.kernels.autotune import Choice, TuneKey, _pick
from dynadiag.kernels.dense import BACKEND as DENSE
from dynadiag.kernels.dense import DiagOps, Plan, cached_weight, clear_weight_cache, gather_weight, scatter_weight
from dynadiag.sparsity import kernel_summary, sparsity_report

needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the cpu ops")


@pytest.fixture
def tune_dir(tmp_path, monkeypatch):
    """A fresh, empty autotune folder, measurement on, nothing remembered from other tests."""
    monkeypatch.setenv("DYNADIAG_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("DYNADIAG_AUTOTUNE", raising=False)
    autotune.set_enabled(None)
    autotune.clear_memory()
    yield tmp_path
    autotune.set_enabled(None)
    autotune.clear_memory()


def _slow_ops(repeat: int = 4) -> DiagOps:
    """A real, deliberately slow diagonal candidate: the dense GEMMs run ``repeat`` times per op."""

    def fwd(x, v, off, out_f):
        w = scatter_weight(v, off, x.shape[1], out_f)
        return [x @ w.t() for _ in range(repeat)][-1]

    def bwd_x(gy, v, off, in_f):
        w = scatter_weight(v, off, in_f, gy.shape[1])
        return [gy @ w for _ in range(repeat)][-1]

    def bwd_v(gy, x, off):
        return [gather_weight(gy.t() @ x, off) for _ in range(repeat)][-1]

    return DiagOps(fwd, bwd_x, bwd_v)


def _layer(in_f=96, out_f=160, sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    layer = DiagLinear(in_f, out_f, sparsity=sparsity)
    with torch.no_grad():
        layer.alpha.copy_(torch.randn_like(layer.alpha))  # free offsets, not one run
        layer.bias.normal_()
    return layer.freeze_()


# ---------------------------------------------------------------------------------------------------- choice logic
def test_pick_takes_the_fastest_plan_per_op():
    ms = {"dense.fwd": 10.0, "dense.scatter": 1.0, "dense.dx": 10.0, "dense.dv": 12.0,
          "cpu.fwd": 3.0, "cpu.dx": 4.0, "cpu.dv": 20.0}  # fmt: skip
    choice = _pick(ms, ["cpu"], training=True)
    assert choice.plan == Plan("cpu", "cpu", "dense")  # the dense grad_V needs no scatter of W
    assert choice.ratio == pytest.approx((1 + 10 + 10 + 12) / (3 + 4 + 12))
    assert _pick(ms, ["cpu"], training=False).plan == Plan("cpu", "cpu", "cpu")


def test_pick_keeps_dense_unless_a_plan_beats_it_by_the_margin():
    near = {"dense.fwd": 10.0, "cpu.fwd": 10.0 * (1 - autotune.MARGIN / 2)}
    choice = _pick(near, ["cpu"], training=False)
    assert choice.plan == Plan() and choice.ratio == 1.0
    slow = {"dense.fwd": 1.0, "dense.scatter": 0.1, "dense.dx": 1.0, "dense.dv": 1.0,
            "cpu.fwd": 2.0, "cpu.dx": 2.0, "cpu.dv": 2.0}  # fmt: skip
    assert _pick(slow, ["cpu"], training=True).plan == Plan()


def test_token_bucket():
    assert [autotune.token_bucket(n) for n in (1, 2, 3, 197, 256, 257, 1576)] == [1, 2, 4, 256, 256, 512, 2048]


@pytest.mark.parametrize("training", [False, True])
def test_real_timings_never_pick_a_plan_measured_slower_than_dense(training):
    layer = _layer()
    values, offsets = layer.V.detach(), layer.offsets
    candidates = {"slow": _slow_ops()}
    if get_backend("auto").candidates:
        candidates |= get_backend("auto").candidates
    choice = autotune.measure(values, offsets, 96, 160, 64, training, candidates)
    assert choice.source == "measured" and choice.ratio >= 1.0
    assert "slow" not in choice.plan  # 4 GEMMs per op never beat one
    ms = choice.ms
    if not training:
        assert ms[f"{choice.plan.fwd}.fwd"] <= ms["dense.fwd"]
    for name in ("slow", *candidates):
        for op in ("fwd", "dx", "dv") if training else ("fwd",):
            assert f"{name}.{op}" in ms and ms[f"{name}.{op}"] > 0


# ---------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("measure", [True, False])
def test_auto_layer_matches_reference_in_training_and_inference(tune_dir, measure):
    autotune.set_enabled(measure)
    layer = _layer()
    ref = _layer()
    ref.backend = "reference"
    x = torch.randn(5, 7, 96)
    for mode in (torch.enable_grad, torch.no_grad):
        with mode():
            xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yr = layer(xa), ref(xr)
            assert torch.allclose(ya, yr, atol=1e-5)
            if mode is torch.enable_grad:
                g = torch.randn_like(ya)
                ya.backward(g)
                yr.backward(g)
                assert torch.allclose(xa.grad, xr.grad, atol=1e-5)
                assert torch.allclose(layer.V.grad, ref.V.grad, atol=1e-4)
                assert torch.allclose(layer.bias.grad, ref.bias.grad, atol=1e-5)
        assert layer.kernel in ("dense", "cpu") or layer.kernel.startswith("fwd=")
        assert (layer.kernel_ratio is not None) == measure


def test_report_and_summary_show_the_choice_and_its_ratio(tune_dir):
    model = torch.nn.Sequential(_layer(), torch.nn.GELU(), _layer(160, 96))
    with torch.no_grad():
        model(torch.randn(33, 96))
    ratios = [m.kernel_ratio for m in (model[0], model[2])]
    assert all(r is not None and r >= 1.0 for r in ratios)
    text = str(sparsity_report(model))
    assert f"{model[0].kernel} {ratios[0]:.2f}x" in text
    assert "x dense)" in kernel_summary(model)


# ---------------------------------------------------------------------------------------------------- the cache
def _problem_key(tune_dir):
    files = list(tune_dir.glob("*.json"))
    assert len(files) == 1
    return files[0], json.loads(files[0].read_text())["choices"]


def test_cache_is_written_keyed_and_reused(tune_dir, monkeypatch):
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(100, 96))
    path, choices = _problem_key(tune_dir)
    (key,) = choices
    assert key.startswith(f"infer|96x160|k{layer.k}|n128|float32|t{torch.get_num_threads()}|")
    # Same bucket: no new entry. Other bucket, dtype, phase: one new entry each.
    with torch.no_grad():
        layer(torch.randn(120, 96))
        layer(torch.randn(300, 96))
        layer(torch.randn(100, 96, dtype=torch.bfloat16))
    layer(torch.randn(100, 96)).sum().backward()
    keys = set(json.loads(path.read_text())["choices"])
    assert len(keys) == 4 and any(k.startswith("train|") for k in keys) and any("|bfloat16|" in k for k in keys)
    # A new process (memory forgotten, new backend) reads the file and measures nothing.
    autotune.clear_memory()

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again although the cache holds the key")

    monkeypatch.setattr(autotune, "measure", no_measure)
    fresh = for_device(torch.device("cpu"))
    choice = fresh.choose(layer.V.detach(), layer.offsets, 96, 160, 100, torch.float32, False)
    assert choice.source == "cache" and str(choice.plan) == choices[key]["plan"]


def test_thread_count_is_part_of_the_key(tune_dir):
    layer = _layer()
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            layer(torch.randn(50, 96))
            torch.set_num_threads(threads + 1)
            layer(torch.randn(50, 96))
    finally:
        torch.set_num_threads(threads)
    _, choices = _problem_key(tune_dir)
    assert {k.split("|")[5] for k in choices} == {f"t{threads}", f"t{threads + 1}"}


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "choices": {}}', '{"format": 1, "choices": 3}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tune_dir, content):
    auto = for_device(torch.device("cpu"))
    path = autotune.cache_path(auto.device_name)
    path.write_text(content)
    layer = _layer()
    with pytest.warns(UserWarning, match="ignoring the unreadable autotune cache"), torch.no_grad():
        y = layer(torch.randn(20, 96))
    assert torch.isfinite(y).all()
    data = json.loads(path.read_text())
    assert data["format"] == autotune.FORMAT and len(data["choices"]) == 1


def test_a_stored_plan_naming_an_unavailable_kernel_is_measured_again(tune_dir):
    auto = AutoBackend(torch.device("cpu"), {"slow": _slow_ops()}, lambda *a: Plan(), "test")
    layer = _layer()
    runs = mean_run(layer.offsets)
    key = TuneKey("infer", 96, 160, layer.k, 32, "float32", torch.get_num_threads(), auto.device_name, "test", runs)
    autotune.store(key, Choice(Plan("gone", "gone", "gone"), 3.0, "measured"))
    choice = auto.choose(layer.V.detach(), layer.offsets, 96, 160, 20, torch.float32, False)
    assert choice.plan == Plan() and choice.source == "measured"


# ---------------------------------------------------------------------------------------------------- the switch
def test_switch_off_uses_the_rule_and_writes_nothing(tune_dir, monkeypatch):
    monkeypatch.setenv("DYNADIAG_AUTOTUNE", "0")
    assert not autotune.enabled()
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(20, 96))
    assert layer.kernel_ratio is None and not list(tune_dir.glob("*.json"))
    auto = get_backend("auto")
    expect = "cpu" if "cpu" in auto.candidates and not auto.isa.startswith("scalar") else "dense"
    assert layer.kernel == expect  # K/P = 0.1: the diagonal kernels where they are vectorised
    dense_layer = _layer(sparsity=0.5)
    with torch.no_grad():
        dense_layer(torch.randn(20, 96))
    assert dense_layer.kernel == "dense"  # half the diagonals kept: dense by the rule
    autotune.set_enabled(True)  # the config value wins over the environment
    assert autotune.enabled()


def test_bad_switch_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DYNADIAG_AUTOTUNE", "maybe")
    autotune.set_enabled(None)
    with pytest.raises(ValueError, match="DYNADIAG_AUTOTUNE must be 1 or 0"):
        autotune.enabled()


def test_config_switch(tune_dir):
    from composition import configure_autotune

    configure_autotune(False)
    assert not autotune.enabled()
    configure_autotune(None)  # leaves the process setting alone
    assert not autotune.enabled()
    with pytest.raises(ValueError, match="autotune must be true, false or null"):
        configure_autotune("yes")


# ---------------------------------------------------------------------------------------------------- dense path
def test_dense_inference_costs_one_linear_on_a_cached_weight():
    clear_weight_cache()
    layer = _layer()
    layer.backend = "dense"
    x = torch.randn(9, 96)
    with torch.no_grad():
        y = layer(x)
        weight = cached_weight(layer.V, layer.offsets, 96, 160, torch.float32)
        assert cached_weight(layer.V, layer.offsets, 96, 160, torch.float32) is weight  # built once
        assert torch.equal(y, F.linear(x, weight, layer.bias))  # exactly nn.Linear's call
        assert torch.equal(weight, layer.dense_weight())
    # An optimizer step (in place) invalidates the cached W.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.dense_weight(), layer.bias), atol=1e-6)
        assert cached_weight(layer.V, layer.offsets, 96, 160, torch.float32) is not weight


def test_dense_training_matches_nn_linear_gradients():
    layer = _layer()
    layer.backend = "dense"
    linear = layer.to_linear()
    x = torch.randn(13, 96)
    xa, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yl = DENSE.diag_linear(xa, layer.V, layer.offsets, layer.bias, 96, 160), linear(xl)
    g = torch.randn_like(ya)
    ya.backward(g)
    yl.backward(g)
    assert torch.allclose(ya, yl, atol=1e-6) and torch.allclose(xa.grad, xl.grad, atol=1e-6)
    assert torch.allclose(layer.bias.grad, linear.bias.grad, atol=1e-6)
    assert torch.allclose(layer.V.grad, gather_weight(linear.weight.grad, layer.offsets), atol=1e-5)


@needs_cxx
def test_fp64_takes_the_diagonal_kernels_for_gradcheck(tune_dir):
    auto = get_backend("auto")
    if "cpu" not in auto.candidates:
        pytest.skip("cpu kernels unavailable")
    layer = _layer(12, 20, sparsity=0.75).double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: layer(a), (x,))
    assert layer.kernel == "cpu" and layer.kernel_ratio is None


@needs_cxx
def test_scalar_kernels_lose_to_dense(tune_dir, monkeypatch):
    """Forced onto the scalar loops (a CPU without a vectorised variant), auto measures them slower and runs dense;
    the rule (measurement off) never picks them either."""
    if "cpu" not in get_backend("auto").candidates:
        pytest.skip("cpu kernels unavailable")
    monkeypatch.setenv("DYNADIAG_CPU_ISA", "scalar")
    auto = for_device(torch.device("cpu"))
    assert auto.isa.startswith("scalar")
    layer = _layer(384, 384)
    values, offsets = layer.V.detach(), layer.offsets
    for training in (False, True):
        choice = auto.choose(values, offsets, 384, 384, 256, torch.float32, training)
        assert choice.plan == Plan() and choice.source == "measured", choice
    autotune.set_enabled(False)
    assert auto.choose(values, offsets, 384, 384, 256, torch.float32, False).plan == Plan()


def test_dense_training_buffer_rewritten_by_a_later_forward_is_not_used():
    """Two layers sharing one offsets tensor share the reused W buffer: the first backward after the second forward
    must scatter its own values again, not read the second layer's."""
    first, second = _layer(), _layer(seed=1)
    second.offsets = first.offsets  # same pattern object, other values
    with torch.no_grad():
        second.V.mul_(-3.0)
    for layer in (first, second):
        layer.backend = "dense"
    x = torch.randn(7, 96)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = first(xa), second(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    for layer, xg in ((first, xa), (second, xb)):
        want = g @ layer.dense_weight().detach()
        assert torch.allclose(xg.grad, want, atol=1e-5)
