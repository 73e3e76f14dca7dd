"""CandidateDiagLinear: the sparse soft phase (candidate set, straight-through soft/hard weights) and its freeze."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynadiag import groups as DG
from dynadiag.candidate_layer import CandidateDiagLinear, candidate_weights
from dynadiag.functional import place_diagonals
from dynadiag.groups import group_offsets
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
    assert layer.V.shape == (ids.numel(), layer.diag_length)  # V stores the candidates' rows only
    w = candidate_weights(layer.alpha[ids], layer.k, layer.temperature, layer.hardness)
    weight = place_diagonals(layer.V * w[:, None], ids, in_f, out_f)  # only the candidates, weighted
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
    assert sparse["V"].shape == (int(layer.candidates.sum()), layer.diag_length)  # the candidates' rows only
    assert (sparse["alpha"][outside] == 0).all() and sparse["alpha"][layer.candidates].abs().sum() > 0


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
        return backend.diag_linear(x, v * scale[:, None], ids, layer.bias.detach(), 6, 9)

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


# ---------------------------------------------------------------------------------------------- grouped, permuted
# (in, out, g): square, wide W (in > out), tall W (out > in); g never divides P, so the last group is short
GROUPED_SHAPES = [(9, 9, 2), (13, 5, 3), (5, 13, 4), (7, 11, 5)]


def make_grouped(in_f, out_f, group, backend="cpu", dtype=torch.float32, permute=True, seed=0, hardness=0.4):
    torch.manual_seed(seed)
    layer = CandidateDiagLinear(
        in_f, out_f, sparsity=0.6, backend=backend, group=group, permute=permute, permute_seed=seed, dtype=dtype
    )
    with torch.no_grad():
        layer.alpha.copy_(torch.randn(layer.num_groups, dtype=dtype))
        layer.bias.copy_(torch.randn(out_f, dtype=dtype))
    count = min(layer.num_groups, layer.k_groups + 2)
    # the short last group is always a candidate, so every shape exercises it
    others = torch.randperm(layer.num_groups - 1)[: count - 1]
    layer.set_candidates_(torch.cat([others, torch.tensor([layer.num_groups - 1])]))
    layer.temperature, layer.hardness = 0.7, hardness
    return layer


def grouped_reference_weight(layer):
    """The layer's ``[out, in]`` weight acting on x itself, built independently: every diagonal of candidate group
    j is V[p] * w_j (zero elsewhere), then the columns are un-permuted."""
    ids = torch.nonzero(layer.candidates).flatten()
    w = candidate_weights(layer.alpha[ids], layer.k_groups, layer.temperature, layer.hardness)
    weight = torch.zeros(layer.out_features, layer.in_features, dtype=layer.V.dtype)
    row = 0  # V stores the candidate groups' diagonals, ascending
    for j, group_id in enumerate(ids.tolist()):
        for p in range(group_id * layer.group, min((group_id + 1) * layer.group, layer.num_diagonals)):
            weight = weight + place_diagonals(layer.V[row : row + 1] * w[j], torch.tensor([p]), *layer_dims(layer))
            row += 1
    assert row == layer.V.shape[0]
    if layer.perm is not None:  # W_diag acts on x[perm]: its column c belongs to input perm[c]
        weight = weight[:, torch.argsort(layer.perm)]
    return weight


def layer_dims(layer):
    return layer.in_features, layer.out_features


@pytest.mark.parametrize(("in_f", "out_f", "group"), GROUPED_SHAPES)
def test_grouped_permuted_float64_gradients_match_a_dense_gemm(in_f, out_f, group):
    layer = make_grouped(in_f, out_f, group, dtype=torch.float64)
    assert layer.num_diagonals % group and layer.perm is not None
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, out_f, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()  # the sparse kernels on the candidate groups' diagonals
    sparse = {"x": x.grad.clone(), "V": layer.V.grad.clone(), "alpha": layer.alpha.grad.clone(), "b": layer.bias.grad}
    x.grad, layer.V.grad, layer.alpha.grad, layer.bias.grad = None, None, None, None
    (F.linear(x, grouped_reference_weight(layer), layer.bias) - target).pow(2).sum().backward()  # dense GEMM
    dense = {"x": x.grad, "V": layer.V.grad, "alpha": layer.alpha.grad, "b": layer.bias.grad}
    for key in sparse:
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-10, atol=1e-10, msg=key)
    outside = ~layer.candidates
    assert (sparse["alpha"][outside] == 0).all() and sparse["alpha"][layer.candidates].abs().min() > 0
    assert sparse["V"].shape[0] == int(outside.logical_not().repeat_interleave(group)[: layer.num_diagonals].sum())
    torch.testing.assert_close(layer.weight, grouped_reference_weight(layer), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("in_f", "out_f", "group"), GROUPED_SHAPES)
def test_full_hardness_weighs_exactly_k_groups_whole_groups(in_f, out_f, group):
    layer = make_grouped(in_f, out_f, group, hardness=1.0)
    weights = layer.selection_weights()  # [P], what the layer computes with
    kept = torch.nonzero(weights).flatten()
    groups = (kept // group).unique()
    assert groups.numel() == layer.k_groups and set(weights[kept].tolist()) == {1.0}
    assert torch.equal(kept, group_offsets(groups, layer.num_diagonals, group))  # whole groups, short one included
    ids = layer.candidate_ids()
    assert torch.equal(groups, ids[torch.topk(layer.alpha.detach()[ids], layer.k_groups).indices].sort().values)
    assert layer_selection(layer)["topk_share"] == pytest.approx(1.0)


@pytest.mark.parametrize(("in_f", "out_f", "group"), GROUPED_SHAPES)
@pytest.mark.parametrize("tied", [False, True])
def test_grouped_freeze_keeps_the_hard_groups_and_changes_nothing(in_f, out_f, group, tied):
    layer = make_grouped(in_f, out_f, group, hardness=1.0)
    if tied:
        with torch.no_grad():
            layer.alpha.zero_()  # every candidate group tied: forward and freeze must break ties the same way
    x = torch.randn(4, in_f)
    before, kept = layer(x).detach(), torch.nonzero(layer.selection_weights()).flatten()
    layer.freeze_()
    assert torch.equal(layer.offsets, kept) and layer.k == kept.numel()
    assert layer.achieved_sparsity == 1 - kept.numel() / layer.num_diagonals
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    fresh = CandidateDiagLinear(in_f, out_f, sparsity=0.6, backend="cpu", group=group)  # unpermuted, soft
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_frozen and torch.equal(fresh.perm, layer.perm) and torch.equal(fresh.offsets, layer.offsets)
    torch.testing.assert_close(fresh(x), layer(x))


def test_from_diag_linear_keeps_group_and_permutation():
    plain = DiagLinear(10, 7, sparsity=0.6, backend="reference", group=3, permute=True, permute_seed=4)
    new = CandidateDiagLinear.from_diag_linear(plain)
    assert (new.group, new.num_groups, new.k_groups, new.k) == (plain.group, plain.num_groups, plain.k_groups, plain.k)
    assert torch.equal(new.perm, plain.perm) and torch.equal(new.V, plain.V) and torch.equal(new.alpha, plain.alpha)
    new.set_candidates_(torch.arange(new.num_groups))
    new.hardness, new.temperature = 0.0, 1.0
    x = torch.randn(3, 10)
    torch.testing.assert_close(new(x), F.linear(x, new.weight, new.bias), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- candidate-only storage
def adam_steps(layer, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, layer.in_features, generator=generator, dtype=layer.V.dtype)
        optimizer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("group", [1, 2])
def test_set_candidates_moves_rows_values_and_optimizer_state(group):
    layer = make_grouped(9, 13, group, permute=False) if group > 1 else make_layer(9, 13, "cpu")
    optimizer = torch.optim.AdamW([layer.V], lr=0.1, weight_decay=0.05, foreach=False)
    adam_steps(layer, optimizer, 2)
    old_ids, old_offsets, old_v = layer.candidate_ids().clone(), layer.candidate_offsets().clone(), layer.V.detach()
    old_state = {key: value.clone() for key, value in optimizer.state[layer.V].items()}
    outside = torch.nonzero(~layer.candidates).flatten()
    stay, regrown, new = old_ids[1:], old_ids[1:2], outside[:1]  # old_ids[0] leaves, old_ids[1] re-enters fresh
    fresh = torch.zeros_like(layer.candidates)
    fresh[torch.cat([regrown, new])] = True
    assert layer.set_candidates_(torch.cat([stay, new]), fresh=fresh, optimizer=optimizer)
    offsets = layer.candidate_offsets()
    assert layer.V.shape == (offsets.numel(), layer.diag_length) and optimizer.param_groups[0]["params"] == [layer.V]
    state = optimizer.state[layer.V]
    assert torch.equal(state["step"], old_state["step"])  # Adam's shared step count carries over
    fresh_offsets = DG.group_offsets(torch.cat([regrown, new]), layer.num_diagonals, group)
    for row, p in enumerate(offsets.tolist()):
        if p in fresh_offsets.tolist():  # grown: zero values, zero moments
            assert (layer.V[row] == 0).all() and (state["exp_avg"][row] == 0).all()
            assert (state["exp_avg_sq"][row] == 0).all()
        else:  # kept: its values and moments, whatever its row moved to
            old_row = old_offsets.tolist().index(p)
            assert torch.equal(layer.V[row], old_v[old_row])
            assert torch.equal(state["exp_avg"][row], old_state["exp_avg"][old_row])
            assert torch.equal(state["exp_avg_sq"][row], old_state["exp_avg_sq"][old_row])
    same = layer.V
    assert not layer.set_candidates_(layer.candidate_ids(), optimizer=optimizer) and layer.V is same  # no change


def test_candidate_storage_trains_exactly_as_storing_every_diagonal():
    """The invariant behind storing only the candidates: a diagonal outside the set never reaches the output and a
    grown one starts at zero with zero Adam state, so AdamW (weight decay included) over ``[K', D]`` rows follows
    the full ``[P, D]`` storage exactly on the candidates' rows (float64, the dense reference forward)."""
    torch.manual_seed(0)
    layer = make_layer(10, 14, "cpu", dtype=torch.float64)
    full = torch.nn.Parameter(torch.zeros(layer.num_diagonals, layer.diag_length, dtype=torch.float64))
    with torch.no_grad():
        full[layer.candidate_offsets()] = layer.V  # [P, D]: what the layer stored before
    opt_layer = torch.optim.AdamW([layer.V], lr=0.05, weight_decay=0.05, foreach=False)
    opt_full = torch.optim.AdamW([full], lr=0.05, weight_decay=0.05, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        if step in (3, 6):  # drop two candidates, grow two (one of them just dropped: it re-enters fresh)
            ids = layer.candidate_ids()
            outside = torch.nonzero(~layer.candidates).flatten()
            grow = torch.cat([ids[:1], outside[step : step + 1]])
            fresh = torch.zeros_like(layer.candidates)
            fresh[grow] = True
            layer.set_candidates_(torch.cat([ids[2:], grow]), fresh=fresh, optimizer=opt_layer)
            with torch.no_grad():  # what the full storage did: zero the grown rows and their Adam moments
                full[grow] = 0.0
                for value in opt_full.state[full].values():
                    if value.dim():
                        value[grow] = 0.0
        x = torch.randn(5, layer.in_features, generator=generator, dtype=torch.float64)
        offsets, w = layer.candidate_offsets(), layer.candidate_weights().detach()
        reference = F.linear(x, place_diagonals(full[offsets] * w[:, None], offsets, 10, 14), layer.bias.detach())
        out = layer(x)
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
        for optimizer, y in ((opt_layer, out), (opt_full, reference)):
            optimizer.zero_grad(set_to_none=True)
            y.square().sum().backward()
            optimizer.step()
        torch.testing.assert_close(layer.V.detach(), full.detach()[layer.candidate_offsets()], rtol=1e-10, atol=1e-12)


def test_a_soft_checkpoint_brings_its_own_candidate_rows():
    layer = make_layer(8, 12, "reference")
    layer.set_candidates_(layer.candidate_ids()[:-2])  # another set size than a fresh layer's (all P)
    fresh = CandidateDiagLinear(8, 12, sparsity=0.7, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    fresh.temperature, fresh.hardness = layer.temperature, layer.hardness
    assert fresh.V.shape == layer.V.shape and torch.equal(fresh.candidates, layer.candidates)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), layer(x))
    # written before candidate-only storage: V held all P rows; the candidates' rows are kept
    old = dict(layer.state_dict())
    old["V"] = torch.randn(layer.num_diagonals, layer.diag_length)
    fresh = CandidateDiagLinear(8, 12, sparsity=0.7, backend="reference")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.V, old["V"][layer.candidate_offsets()])


def test_kept_dropped_values_come_back():
    torch.manual_seed(0)
    layer = CandidateDiagLinear(8, 12, sparsity=0.7, backend="reference")  # every diagonal a candidate
    initial = layer.V.detach().clone()  # [P, D]
    layer.keep_dropped_values_()  # before the first shrink, as sparse_dynadiag does for grow_init=keep
    layer.set_candidates_(torch.arange(0, layer.num_diagonals, 2))
    with torch.no_grad():
        layer.V.add_(1.0)  # training moved the candidates
    moved = {int(p): layer.V[i].clone() for i, p in enumerate(layer.candidate_offsets())}
    layer.set_candidates_(torch.arange(2, layer.num_diagonals, 2))  # diagonal 0 leaves
    layer.set_candidates_(torch.tensor([0, 1, 2, 4]))  # 0 comes back, 1 enters for the first time
    assert torch.equal(layer.V[0], moved[0]) and torch.equal(layer.V[2], moved[2])  # the values they had
    assert torch.equal(layer.V[1], initial[1])  # never trained: its initial values


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("hardness", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("extra", [0, 5])  # K' = K (theta from the spread) and K' > K
def test_weighted_rows_node_is_bit_identical_to_the_composed_ops(normalize, hardness, extra):
    from dynadiag.candidate_layer import weighted_candidate_rows

    torch.manual_seed(3)
    layer = CandidateDiagLinear(24, 40, sparsity=0.8)
    with torch.no_grad():
        layer.alpha.normal_()
    ids = torch.randperm(layer.num_diagonals)[: layer.k + extra].sort().values
    layer.set_candidates_(ids)
    with torch.no_grad():
        layer.V.normal_()
    args = (layer.k_groups, 0.3, hardness, normalize)
    grad = torch.randn(layer.V.shape)
    fused = weighted_candidate_rows(layer.V, layer.alpha, layer.candidate_ids(), *args)
    gv, ga = torch.autograd.grad(fused, (layer.V, layer.alpha), grad)
    composed = layer.V * candidate_weights(layer.alpha[layer.candidate_ids()], *args)[:, None]
    cv, ca = torch.autograd.grad(composed, (layer.V, layer.alpha), grad)
    assert torch.equal(fused, composed) and torch.equal(gv, cv) and torch.equal(ga, ca)
