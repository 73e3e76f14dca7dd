import pytest
import torch
from torch import nn

from dynadiag import DiagConv2d, DiagLinear
from dynadiag import functional as DF

SHAPES = [(8, 8), (12, 4), (4, 12), (1, 7), (7, 1), (13, 5), (5, 13)]


def _explicit_weight(layer: DiagLinear) -> torch.Tensor:  # float64 [out, in]
    """The layer's matrix by definition, element by element, independently of dynadiag's index and weight code.

    Element ``t`` of diagonal ``p`` sits at ``W[(t + p) % out, t]`` when ``out >= in``, else ``W[t, (t + p) % in]``;
    in the soft phase it is scaled by ``w_p = clamp(k * softmax(alpha / T), 0, 1)``, once frozen by 1.
    """
    out_f, in_f = layer.out_features, layer.in_features
    values = layer.V.detach().double()
    if layer.is_frozen:
        diagonals, scales = layer.offsets.tolist(), [1.0] * layer.k
    else:
        diagonals = list(range(layer.num_diagonals))
        soft = layer.k * torch.softmax(layer.alpha.detach().double() / layer.temperature, dim=0)
        scales = soft.clamp(0, 1).tolist()
    weight = torch.zeros(out_f, in_f, dtype=torch.float64)
    for row, (p, scale) in enumerate(zip(diagonals, scales)):
        for t in range(min(in_f, out_f)):
            r, c = ((t + p) % out_f, t) if out_f >= in_f else (t, (t + p) % in_f)
            weight[r, c] = scale * values[row, t]
    return weight


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_init_and_shapes(in_f, out_f):
    layer = DiagLinear(in_f, out_f, sparsity=0.7)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    assert layer.V.shape == (num_diag, length) and layer.alpha.shape == (num_diag,)
    assert torch.allclose(layer.alpha, torch.full((num_diag,), 1.0 / num_diag))
    assert torch.count_nonzero(layer.bias) == 0
    assert layer.V.abs().max() <= 1.0 / length**0.5 + 1e-6  # kaiming-uniform a=sqrt(5), fan-in D
    assert layer.k == DF.num_active_diagonals(in_f, out_f, 0.7)


def test_kaiming_uniform_init_by_its_statistics():
    """V ~ U(-b, b) with b = 1/sqrt(D) (kaiming-uniform, a = sqrt(5), fan-in D): a zero, constant or normal init
    fails one of these (130k samples: the std is within 1 % of b/sqrt(3) with overwhelming probability)."""
    layer = DiagLinear(256, 512, sparsity=0.9)
    values, bound = layer.V.detach(), 1.0 / 256**0.5
    assert values.abs().max() <= bound and values.abs().max() > 0.99 * bound
    assert values.std().item() == pytest.approx(bound / 3**0.5, rel=0.01)
    assert abs(values.mean().item()) < 0.01 * bound


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_soft_forward_is_weighted_sum_of_placements(in_f, out_f):
    layer = DiagLinear(in_f, out_f, sparsity=0.5).double()
    with torch.no_grad():
        layer.alpha.normal_()
    layer.temperature = 0.3
    torch.testing.assert_close(layer.dense_weight(), _explicit_weight(layer), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, in_f, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ _explicit_weight(layer).T + layer.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_freeze_keeps_exactly_k_diagonals(in_f, out_f):
    layer = DiagLinear(in_f, out_f, sparsity=0.6)
    with torch.no_grad():
        layer.alpha.copy_(torch.randperm(layer.num_diagonals).float())
    expected = torch.topk(layer.alpha, layer.k).indices.sort().values
    kept_values = layer.V.detach()[expected].clone()
    layer.freeze_()
    assert layer.is_frozen and layer.V.shape == (layer.k, layer.diag_length)
    assert torch.equal(layer.offsets, expected)
    assert torch.equal(layer.V.detach(), kept_values)
    assert not isinstance(layer.alpha, nn.Parameter)
    assert all(name != "alpha" for name, _ in layer.named_parameters())
    # Exactly k whole diagonals are non-zero in the dense equivalent.
    values = DF.gather_diagonals(layer.dense_weight().detach())
    assert (values.abs().sum(1) > 0).sum() == layer.k
    assert torch.count_nonzero(layer.dense_weight()) == layer.k * layer.diag_length


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_frozen_forward_and_grads_match_dense(in_f, out_f):
    layer = DiagLinear(in_f, out_f, sparsity=0.5, backend="reference").double().freeze_()
    dense = layer.to_linear()
    x = torch.randn(4, 2, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, x @ dense.weight.T + dense.bias)
    grad = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, layer.V, layer.bias), grad)
    x2 = x.detach().requires_grad_()
    dense_y = dense(x2)
    dgx, dgw, dgb = torch.autograd.grad(dense_y, (x2, dense.weight, dense.bias), grad)
    assert torch.allclose(gx, dgx) and torch.allclose(gb, dgb)
    assert torch.allclose(gv, DF.gather_diagonals(dgw, layer.offsets))


@pytest.mark.parametrize("in_f,out_f", [(5, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradcheck(in_f, out_f, frozen):
    layer = DiagLinear(in_f, out_f, sparsity=0.4, backend="reference").double()
    with torch.no_grad():
        layer.alpha.normal_()
    if frozen:
        layer.freeze_()
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, in_f, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()])
    assert torch.autograd.gradcheck(fn, inputs)


def test_from_linear_to_linear_roundtrip_at_sparsity_zero():
    linear = nn.Linear(6, 10)
    layer = DiagLinear.from_linear(linear, 0.0, freeze=True)
    assert layer.k == layer.num_diagonals
    assert torch.allclose(layer.to_linear().weight, linear.weight)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)


def test_from_linear_ranks_diagonals_by_norm():
    linear = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        for p, scale in ((2, 5.0), (6, 3.0)):
            rows, cols = DF.diag_index(8, 8, torch.tensor([p]))
            linear.weight[rows, cols] = scale
    layer = DiagLinear.from_linear(linear, sparsity=0.75, freeze=True)  # k = 2
    assert layer.offsets.tolist() == [2, 6]
    assert torch.allclose(layer.to_linear().weight, linear.weight)


@pytest.mark.parametrize("frozen", [False, True])
def test_state_dict_roundtrip(frozen):
    layer = DiagLinear(12, 5, sparsity=0.5)
    with torch.no_grad():
        layer.alpha.normal_()
    if frozen:
        layer.freeze_()
    fresh = DiagLinear(12, 5, sparsity=0.5)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_frozen == frozen
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), layer(x))
    if frozen:
        with pytest.raises(RuntimeError, match="soft-phase"):
            layer.load_state_dict(DiagLinear(12, 5, sparsity=0.5).state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen", [False, True])
def test_low_precision_inputs(dtype, frozen):
    layer = DiagLinear(16, 24, sparsity=0.8, backend="reference").to(dtype)
    with torch.no_grad():
        layer.alpha.normal_()
        layer.bias.normal_()
    layer.temperature = 0.5
    if frozen:
        layer.freeze_()
    x = torch.randn(2, 5, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    # fp64 oracle from the stored (rounded) parameters; the tolerance is the dtype's rounding of ~16-term sums
    ref = x.double() @ _explicit_weight(layer).T + layer.bias.double()
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tolerance, atol=tolerance)


def test_autocast_frozen():
    """Under bf16 autocast a frozen layer computes the same function in bf16: inputs and kept values rounded to
    bf16, products summed in fp32, the result rounded once (a wrong offset, a lost bias or fp32 output fails)."""
    torch.manual_seed(0)
    layer = DiagLinear(16, 8, sparsity=0.5, backend="reference").freeze_()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    weight = _explicit_weight(layer).to(torch.bfloat16).double()  # [out, in], the bf16 values autocast uses
    ref = x.to(torch.bfloat16).double() @ weight.T + layer.bias.to(torch.bfloat16).double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the output


def test_bad_inputs():
    with pytest.raises(ValueError, match="sparsity"):
        DiagLinear(4, 4, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        DiagLinear(4, 4, sparsity=-0.5)
    layer = DiagLinear(4, 6, sparsity=0.5)
    layer.layer_name = "blocks.0.mlp.fc1"
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.*last dimension is 5, expected 4"):
        layer(torch.randn(2, 5))


def test_diag_conv2d_matches_dense_conv():
    conv = nn.Conv2d(6, 10, 3, padding=1)
    layer = DiagConv2d.from_conv(conv, sparsity=0.0, freeze=True)
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    sparse = DiagConv2d.from_conv(conv, sparsity=0.7, freeze=True)
    weight = sparse.dense_weight().detach()
    # the same diagonals are kept for every kernel tap
    masks = [(weight[..., i, j] != 0) for i in range(3) for j in range(3)]
    assert all(torch.equal(masks[0], m) for m in masks)
    assert torch.allclose(sparse(x), sparse.to_conv()(x), atol=1e-5)
    fresh = DiagConv2d(6, 10, (3, 3), padding=(1, 1), sparsity=0.7)
    fresh.load_state_dict(sparse.state_dict())
    assert torch.equal(fresh(x), sparse(x))


def test_first_call_compiles_without_graph_break():
    # freeze_() resolves the backend, so even a model's very first (compiled) call needs no import in forward.
    model = nn.Sequential(DiagLinear(32, 48, sparsity=0.9), nn.GELU(), DiagLinear(48, 32, sparsity=0.9))
    for layer in model:
        if isinstance(layer, DiagLinear):
            layer.freeze_()
    explained = torch._dynamo.explain(model)(torch.randn(3, 32))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("in_f,out_f", [(12, 5), (5, 12), (8, 8)])
def test_freeze_folding_soft_weights_keeps_kept_diagonals_exact(in_f, out_f):
    layer = DiagLinear(in_f, out_f, sparsity=0.5).double()
    with torch.no_grad():
        layer.alpha.normal_()
    layer.temperature = 0.7
    before = layer.dense_weight().detach()
    keep = torch.topk(layer.alpha.detach(), layer.k).indices.sort().values
    layer.freeze_(fold_soft_weights=True)
    rows, cols = DF.diag_index(in_f, out_f, keep)
    expected = torch.zeros_like(before)
    expected[rows, cols] = before[rows, cols]
    assert torch.allclose(layer.dense_weight(), expected)
    assert (layer.soft_weights() == 1).all()


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
def test_weight_property_is_the_dense_matrix_the_layer_computes(frozen, permuted):
    """Code that reads ``layer.weight`` (timm's EVA/Swin-V2 attention) gets what ``forward`` computes, with grads."""
    torch.manual_seed(0)
    layer = DiagLinear(12, 20, sparsity=0.7, backend="reference").double()
    if permuted:
        layer.set_permutation_(torch.randperm(12))
    layer.temperature = 0.5
    torch.nn.init.normal_(layer.alpha)
    torch.nn.init.normal_(layer.bias)
    if frozen:
        layer.freeze_()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    weight = layer.weight
    assert weight.shape == (20, 12) and not isinstance(weight, nn.Parameter)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, layer.bias), layer(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight, layer.to_linear().weight, rtol=0, atol=0)
    if frozen:  # exactly K diagonals: the rest of the matrix is zero
        assert int((weight != 0).sum()) <= layer.k * layer.diag_length
    (weight * torch.randn_like(weight)).sum().backward()
    assert layer.V.grad is not None and layer.V.grad.abs().sum() > 0
    if not frozen:
        assert layer.alpha.grad is not None and layer.alpha.grad.abs().sum() > 0
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    with pytest.raises((AttributeError, KeyError)):  # read-only: a tensor or a parameter cannot be assigned
        layer.weight = torch.zeros(20, 12)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(20, 12))


def test_diag_conv2d_weight_property():
    torch.manual_seed(0)
    conv = DiagConv2d(6, 10, (3, 3), padding=(1, 1), sparsity=0.6).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), conv(x), rtol=1e-12, atol=1e-12
    )
    conv.weight.sum().backward()
    assert conv.V.grad is not None and conv.alpha.grad is not None
