import math

import pytest
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag import functional as DF
from dynadiag import groups as DG
from dynadiag.sparsify import DiagSparsifyConfig, sparsify_

SHAPES = [(8, 8), (12, 4), (4, 12), (13, 5), (5, 13), (64, 192), (256, 64)]
GROUPS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("num_diag", [1, 5, 8, 12, 13, 64])
@pytest.mark.parametrize("group", GROUPS)
def test_groups_partition_diagonals(num_diag, group):
    sizes = DG.group_sizes(num_diag, group)
    assert sizes.numel() == DG.num_groups(num_diag, group) == math.ceil(num_diag / group)
    assert int(sizes.sum()) == num_diag and (sizes[:-1] == group).all() and 1 <= sizes[-1] <= group
    all_groups = torch.arange(sizes.numel())
    # every offset in exactly one group: expanding all groups gives 0..P-1 once each
    assert torch.equal(DG.group_offsets(all_groups, num_diag, group), torch.arange(num_diag))
    assert torch.equal(DG.diagonal_groups(num_diag, group), torch.arange(num_diag) // group)
    # a group's offsets are consecutive
    for j in range(sizes.numel()):
        offs = DG.group_offsets(torch.tensor([j]), num_diag, group)
        assert offs.tolist() == list(range(j * group, j * group + int(sizes[j])))


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
def test_active_group_count(in_f, out_f, group, sparsity):
    k = DF.num_active_diagonals(in_f, out_f, sparsity)
    num_diag, _ = DF.diag_dims(in_f, out_f)
    gk = DG.num_active_groups(in_f, out_f, sparsity, group)
    assert gk == min(DG.num_groups(num_diag, group), math.ceil(k / group))
    if group == 1:
        assert gk == k


def test_expand_and_scores():
    w = torch.tensor([0.1, 0.2, 0.3])
    assert DG.expand_group_weights(w, 7, 3).tolist() == pytest.approx([0.1] * 3 + [0.2] * 3 + [0.3])
    scores = torch.arange(7.0)
    assert DG.group_scores(scores, 3, "sum").tolist() == [3.0, 12.0, 6.0]
    assert DG.group_scores(scores, 3, "mean").tolist() == [1.0, 4.0, 6.0]
    assert torch.allclose(DG.group_scores(scores, 3), torch.tensor([5.0, 50.0, 36.0]).sqrt())
    assert DG.group_scores(scores, 1) is scores
    with pytest.raises(ValueError):
        DG.validate_group(0)


def test_offset_runs():
    offsets = torch.tensor([0, 1, 2, 5, 8, 9, 10, 11, 12])
    assert DG.offset_runs(offsets) == [(0, 0, 3), (3, 5, 1), (4, 8, 5)]
    assert DG.offset_runs(offsets, max_len=2) == [(0, 0, 2), (2, 2, 1), (3, 5, 1), (4, 8, 2), (6, 10, 2), (8, 12, 1)]
    assert DG.offset_runs(torch.tensor([], dtype=torch.long)) == []


def test_permutation_is_seeded_per_layer():
    a = DG.input_permutation(64, 0, "blocks.0.attn.qkv")
    assert torch.equal(a.sort().values, torch.arange(64))
    assert torch.equal(a, DG.input_permutation(64, 0, "blocks.0.attn.qkv"))
    assert not torch.equal(a, DG.input_permutation(64, 0, "blocks.0.mlp.fc1"))
    assert not torch.equal(a, DG.input_permutation(64, 1, "blocks.0.attn.qkv"))


def _layer(in_f, out_f, sparsity, group, permute=False):
    layer = DiagLinear(in_f, out_f, sparsity=sparsity, group=group, permute=permute, backend="reference")
    with torch.no_grad():
        layer.alpha.copy_(torch.randn(layer.num_groups))
    return layer


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("group", [2, 3, 8])
def test_grouped_layer_soft_weights_and_freeze(in_f, out_f, group):
    torch.manual_seed(0)
    layer = _layer(in_f, out_f, 0.7, group)
    num_diag = layer.num_diagonals
    assert layer.alpha.shape == (DG.num_groups(num_diag, group),)
    layer.temperature = 0.5
    w = layer.soft_weights()
    assert w.shape == (num_diag,)
    # every diagonal carries its group's weight
    gw = DF.soft_topk_weights(layer.alpha, layer.k_groups, 0.5)
    assert torch.equal(w, gw[torch.arange(num_diag) // group])
    kept_groups = torch.topk(layer.alpha.detach(), layer.k_groups).indices
    layer.freeze_()
    expected = DG.group_offsets(kept_groups, num_diag, group)
    assert torch.equal(layer.offsets, expected)
    assert layer.k == expected.numel() == DG.kept_diagonals(num_diag, group, kept_groups)
    assert (layer.offsets // group).unique().numel() == layer.k_groups
    # exact sparsity: the dense equivalent has exactly k whole diagonals
    nnz = torch.count_nonzero(layer.dense_weight())
    assert nnz == layer.k * layer.diag_length
    assert layer.achieved_sparsity == pytest.approx(1 - nnz.item() / (in_f * out_f))


def test_short_last_group_changes_k_at_freeze():
    layer = _layer(4, 13, 0.5, 4)  # P = 13 -> groups of 4, 4, 4, 1; K = 7 -> 2 groups
    assert layer.k_groups == 2 and layer.k == 8
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))  # keeps group 2 (4 offsets) and the short group 3
    layer.freeze_()
    assert layer.offsets.tolist() == [8, 9, 10, 11, 12] and layer.k == 5
    assert layer.achieved_sparsity == pytest.approx(1 - 5 / 13)


def test_vit_b_grouped_sparsity():
    # ViT-B at 90 %: K = 231 of 2304 (qkv), 77 of 768 (proj); groups of 32 keep ceil(K/32) whole groups.
    qkv = DiagLinear(768, 2304, sparsity=0.9, group=32)
    assert (qkv.k_groups, qkv.k) == (8, 256)
    proj = DiagLinear(768, 768, sparsity=0.9, group=32)
    assert (proj.k_groups, proj.k) == (3, 96) and proj.achieved_sparsity == pytest.approx(0.875)


def test_group_one_is_unchanged():
    # g = 1 is bit-for-bit the ungrouped layer (same init, same soft weights, same freeze).
    torch.manual_seed(3)
    a = DiagLinear(24, 40, sparsity=0.8)
    torch.manual_seed(3)
    b = DiagLinear(24, 40, sparsity=0.8, group=1)
    assert a.alpha.shape == b.alpha.shape == (40,)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("in_f,out_f", [(12, 5), (5, 12), (16, 16)])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("frozen", [False, True])
def test_permuted_layer_matches_to_linear(in_f, out_f, group, frozen):
    torch.manual_seed(1)
    layer = _layer(in_f, out_f, 0.5, group, permute=True).double()
    assert layer.perm is not None and torch.equal(layer.perm.sort().values, torch.arange(in_f))
    layer.temperature = 0.7
    if frozen:
        layer.freeze_()
    x = torch.randn(3, in_f, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.to_linear()(x))
    assert torch.allclose(layer(x), x[:, layer.perm] @ layer.dense_weight().T + layer.bias)


@pytest.mark.parametrize("in_f,out_f", [(12, 5), (5, 12), (16, 16)])
@pytest.mark.parametrize("group", [2, 3])
def test_from_linear_to_linear_roundtrip_grouped_permuted(in_f, out_f, group):
    linear = nn.Linear(in_f, out_f).double()
    perm = DG.input_permutation(in_f, 0, "x")
    layer = DiagLinear.from_linear(linear, 0.0, group=group, perm=perm, freeze=True)
    assert layer.k == layer.num_diagonals
    assert torch.allclose(layer.to_linear().weight, linear.weight)
    x = torch.randn(3, in_f, dtype=torch.float64)
    assert torch.allclose(layer(x), linear(x))
    # at 50 % the kept groups are the ones with the largest norm
    sparse = DiagLinear.from_linear(linear, 0.5, group=group, perm=perm)
    norms = DG.group_scores(DF.gather_diagonals(linear.weight.detach()[:, perm]).norm(dim=1), group)
    assert torch.allclose(sparse.alpha, norms)
    kept = torch.topk(norms, sparse.k_groups).indices
    sparse.freeze_()
    assert torch.equal(sparse.offsets, DG.group_offsets(kept, sparse.num_diagonals, group))
    dense = sparse.to_linear().weight.detach()
    assert torch.equal(dense[:, perm] != 0, sparse.dense_weight().detach() != 0)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("permute", [False, True])
def test_grouped_state_dict_roundtrip(frozen, permute):
    torch.manual_seed(2)
    layer = _layer(12, 20, 0.6, 4, permute=permute)
    layer.perm = None if not permute else DG.input_permutation(12, 5, "other")
    if frozen:
        layer.freeze_()
    state = layer.state_dict()
    assert ("perm" in state) == permute
    fresh = DiagLinear(12, 20, sparsity=0.6, group=4, backend="reference")  # no permutation of its own
    fresh.load_state_dict(state)
    assert fresh.is_frozen == frozen and fresh.k == layer.k
    if permute:
        assert torch.equal(fresh.perm, layer.perm)
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), layer(x))


def test_sparsify_config_group_and_permute():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 64))
    model.add_module("fc2", nn.Linear(64, 16))
    report = sparsify_(model, DiagSparsifyConfig(sparsity=0.9, include=["fc*"], group=8, permute=True, permute_seed=3))
    assert [r.group for r in report.layers] == [8, 8]
    assert model.fc1.perm is not None and torch.equal(model.fc1.perm, DG.input_permutation(16, 3, "fc1"))
    assert model.fc1.alpha.shape == (8,) and model.fc1.k_groups == 1
    assert torch.allclose(model.fc1.alpha, torch.full((8,), 1 / 8))
    assert report.layers[0].sparsity == pytest.approx(1 - 8 / 64)
    with pytest.raises(ValueError, match="group"):
        DiagSparsifyConfig(sparsity=0.9, group=0)


def test_grouped_gradcheck():
    layer = _layer(6, 9, 0.4, 2, permute=True).double()
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()])
    assert torch.autograd.gradcheck(fn, inputs)


def test_selection_stats_of_grouped_layer_match_its_freeze():
    from dynadiag.selection_stats import layer_selection

    layer = _layer(64, 192, 0.9, 32)  # G = 6 groups, k_groups = 1, k = 32 diagonals
    stats = layer_selection(layer)
    assert stats["selected"].numel() == layer.k
    layer.freeze_()
    assert torch.equal(stats["selected"], layer.offsets)
    assert torch.equal(layer_selection(layer)["selected"], layer.offsets)
