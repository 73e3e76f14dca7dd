"""CandidateDiagLinear: the sparse soft phase (candidate set, straight-through soft/hard weights) and its freeze."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynadiag.candidate_layer import CandidateDiagLinear, candidate_weights
from dynadiag.functional import place_diagonals
from dynadiag.layers import DiagLinear
from dynadiag.selection_stats import layer_selection

SHAPES = [(8, 8), (12, 5), (5, 12)]  # square, tall-input (wide W), tall W


def make_layer(in_f, out_f, backend, dtype=torch.float32, candidates=None, seed=0):
    torch.manual_seed(seed)
    layer = CandidateDiagLinear(in_f, out_f, sparsity=0.7, backend=backend, dtype=dtype)
    with torch.no_grad():
        layer.alpha.copy_(torch.randn(layer.num_diagonals, dtype=dtype))
        layer.bias.copy_(torch.randn(out_f, dtype=dtype))
    count = candidates or min(layer.num_diagonals, 2 * layer.k + 1)
    layer.set_candidates_(torch.randperm(layer.num_diagonals)[:count])
    layer.temperature, layer.hardness = 0.7, 0.4
    return layer


def test_full_hardness_is_exactly_the_top_k_indicator_with_the_soft_gradient():
    alpha = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5], requires_grad=True)
    hard = candidate_weights(alpha, 2, temperature=0.5, hardness=1.0)
    assert hard.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    hard.sum().backward()
    grad_hard = alpha.grad.clone()
    alpha.grad = None
    candidate_weights(alpha, 2, temperature=0.5, hardness=0.0).sum().backward()
    torch.testing.assert_close(grad_hard, alpha.grad)  # straight-through: gradient of the soft weights
    soft = candidate_weights(alpha.detach(), 2, temperature=0.5, hardness=0.0)
    assert soft[2] > 0.5 and soft[4] > 0.5 and (soft[[0, 1, 3]] < 0.5).all()  # the K-boundary sits at 0.5


def test_temperature_is_relative_to_the_alpha_spread():
    alpha = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5])
    torch.testing.assert_close(candidate_weights(alpha, 2, 0.5, 0.0), candidate_weights(10 * alpha + 3, 2, 0.5, 0.0))


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_sparse_soft_forward_matches_dense_reference(in_f, out_f):
    layer = make_layer(in_f, out_f, "cpu")
    x = torch.randn(3, 4, in_f)
    ids = layer.candidate_ids()
    w = candidate_weights(layer.alpha[ids], layer.k, layer.temperature, layer.hardness)
    weight = place_diagonals(layer.V[ids] * w[:, None], ids, in_f, out_f)  # only the candidates, weighted
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_float64_gradients_match_the_dense_reference(in_f, out_f):
    layer = make_layer(in_f, out_f, "cpu", dtype=torch.float64)
    x = torch.randn(6, in_f, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, out_f, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()
    sparse = {"x": x.grad.clone(), "V": layer.V.grad.clone(), "alpha": layer.alpha.grad.clone(), "b": layer.bias.grad}
    x.grad, layer.V.grad, layer.alpha.grad, layer.bias.grad = None, None, None, None
    (F.linear(x, layer.dense_weight(), layer.bias) - target).pow(2).sum().backward()  # dense GEMM reference
    dense = {"x": x.grad, "V": layer.V.grad, "alpha": layer.alpha.grad, "b": layer.bias.grad}
    for key in sparse:
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-10, atol=1e-10, msg=key)
    outside = ~layer.candidates
    assert (sparse["V"][outside] == 0).all() and (sparse["alpha"][outside] == 0).all()
    assert sparse["alpha"][layer.candidates].abs().sum() > 0


def test_float64_gradcheck_through_the_kernels():
    # x and V against finite differences through the real kernels (alpha's gradient deliberately treats the
    # K-boundary and the spread as constants, so finite differences in alpha are not its reference: see above)
    from dynadiag.kernels import get_backend

    layer = make_layer(6, 9, "cpu", dtype=torch.float64)
    ids = layer.candidate_ids()
    scale = layer.candidate_weights().detach()
    backend = get_backend("cpu", torch.device("cpu"))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    v = layer.V.detach().clone().requires_grad_()

    def run(x, v):
        return backend.diag_linear(x, v[ids] * scale[:, None], ids, layer.bias.detach(), 6, 9)

    assert torch.autograd.gradcheck(run, (x, v), eps=1e-6, atol=1e-6)


def test_freeze_keeps_the_hard_top_k_and_changes_nothing_at_full_hardness():
    layer = make_layer(10, 16, "cpu")
    layer.hardness = 1.0
    x = torch.randn(5, 10)
    before = layer(x).detach()
    ids = layer.candidate_ids()
    expected = ids[torch.topk(layer.alpha.detach()[ids], layer.k).indices].sort().values
    assert layer_selection(layer)["selected"].tolist() == expected.tolist()
    layer.freeze_()
    assert layer.offsets.tolist() == expected.tolist() and layer.V.shape == (layer.k, layer.diag_length)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_frozen_state_loads_into_a_fresh_layer():
    layer = make_layer(8, 12, "reference")
    layer.freeze_()
    fresh = CandidateDiagLinear(8, 12, sparsity=0.7, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    assert fresh.is_frozen and torch.equal(fresh.offsets, layer.offsets)
    torch.testing.assert_close(fresh(x), layer(x))


def test_soft_state_roundtrip_keeps_alpha_trainable():
    layer = make_layer(8, 8, "reference")
    fresh = CandidateDiagLinear(8, 8, sparsity=0.7, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.candidates, layer.candidates) and fresh.alpha.requires_grad
    assert "alpha" not in dict(fresh.named_parameters())  # the method's own optimizer trains it
    assert fresh.soft_nnz == int(layer.candidates.sum()) * layer.diag_length


def test_from_diag_linear_copies_the_layer():
    plain = DiagLinear(6, 10, sparsity=0.8, backend="reference")
    new = CandidateDiagLinear.from_diag_linear(plain)
    x = torch.randn(2, 6)
    assert new.k == plain.k and torch.equal(new.V, plain.V)
    new.set_candidates_(torch.arange(new.num_diagonals))
    new.hardness = 0.0
    assert new(x).shape == (2, 10)


def test_normalized_soft_weights_average_one_over_the_top_k():
    alpha = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5])
    weights = candidate_weights(alpha, 2, temperature=0.5, hardness=0.0, normalize=True)
    assert weights[[2, 4]].mean().item() == pytest.approx(1.0)
    assert candidate_weights(alpha, 2, 0.5, 1.0, normalize=True).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]


def test_freeze_with_tied_alpha_keeps_the_forward_set():
    layer = make_layer(10, 16, "cpu")
    with torch.no_grad():
        layer.alpha.zero_()  # every candidate tied: the forward's and the freeze's tie-breaking must agree
    layer.hardness = 1.0
    x = torch.randn(5, 10)
    before = layer(x).detach()
    layer.freeze_()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert (layer.alpha == 0).all()  # the real logits are back in the buffer
