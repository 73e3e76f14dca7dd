import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynadiag import functional as DF

SHAPES = [(8, 8), (12, 4), (4, 12), (6, 4), (1, 1), (1, 7), (7, 1), (13, 5), (5, 13), (17, 17), (3, 11)]


def _coverage(in_f: int, out_f: int) -> torch.Tensor:
    rows, cols = DF.diag_index(in_f, out_f)
    counts = torch.zeros(out_f, in_f, dtype=torch.long)
    counts.index_put_((rows.reshape(-1), cols.reshape(-1)), torch.ones(rows.numel(), dtype=torch.long), accumulate=True)
    return counts


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_diagonals_partition_weight(in_f, out_f):
    assert torch.equal(_coverage(in_f, out_f), torch.ones(out_f, in_f, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_diagonals_partition_weight_property(in_f, out_f):
    assert torch.equal(_coverage(in_f, out_f), torch.ones(out_f, in_f, dtype=torch.long))


def test_index_map_matches_documented_formula():
    rows, cols = DF.diag_index(4, 12)  # out >= in: W[(t + p) % out, t]
    assert (rows[5, 3].item(), cols[5, 3].item()) == ((3 + 5) % 12, 3)
    rows, cols = DF.diag_index(12, 4)  # out < in: W[t, (t + p) % in]
    assert (rows[9, 2].item(), cols[9, 2].item()) == (2, (2 + 9) % 12)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_place_gather_roundtrip(in_f, out_f):
    weight = torch.randn(out_f, in_f)
    values = DF.gather_diagonals(weight)
    assert values.shape == (max(in_f, out_f), min(in_f, out_f))
    assert torch.equal(DF.place_diagonals(values, None, in_f, out_f), weight)


def test_k_formula_vit_b():
    # DESIGN.md: ViT-B at S=0.9 -> qkv 231/2304, proj 77/768, fc1 308/3072, fc2 308/3072.
    assert DF.num_active_diagonals(768, 2304, 0.9) == 231
    assert DF.num_active_diagonals(768, 768, 0.9) == 77
    assert DF.num_active_diagonals(768, 3072, 0.9) == 308
    assert DF.num_active_diagonals(3072, 768, 0.9) == 308


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_k_formula_bounds(in_f, out_f, sparsity):
    k = DF.num_active_diagonals(in_f, out_f, sparsity)
    num_diag, length = DF.diag_dims(in_f, out_f)
    assert 1 <= k <= num_diag
    # K is the fewest diagonals holding the target number of weights int((1 - S) in out) (at least one)
    target = int((1 - sparsity) * in_f * out_f)
    assert k * length >= target and (k == 1 or (k - 1) * length < target)


@pytest.mark.parametrize(
    ("in_f", "out_f", "sparsity", "k"),
    [  # worked by hand: P = max, D = min, target = int((1 - S) in out), K = ceil(target / D), at least 1
        (13, 5, 0.5, 7),  # target 32, D 5
        (8, 8, 0.5, 4),  # target 32, D 8
        (12, 4, 0.0, 12),  # dense: all P diagonals
        (4, 12, 0.9, 1),  # target int(4.8) = 4 <= D 4
        (17, 17, 0.95, 1),  # target 14 < D 17
        (20, 12, 0.75, 5),  # target 60, D 12
    ],
)
def test_k_by_hand(in_f, out_f, sparsity, k):
    assert DF.num_active_diagonals(in_f, out_f, sparsity) == k


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        DF.num_active_diagonals(4, 4, bad)


def test_soft_topk_properties():
    alpha = torch.randn(50)
    for temperature in (100.0, 1.0, 0.01):
        w = DF.soft_topk_weights(alpha, 5, temperature)
        assert w.shape == (50,)
        assert (w >= 0).all() and (w <= 1).all()
        assert w.sum() <= 5 + 1e-5
        # Monotone in alpha: ranking is preserved.
        order = alpha.argsort()
        assert (w[order].diff() >= -1e-7).all()
    # High temperature spreads the weight evenly (k / P each), low temperature saturates the top entries.
    assert torch.allclose(DF.soft_topk_weights(alpha, 5, 1e6), torch.full((50,), 0.1), atol=1e-4)
    low = DF.soft_topk_weights(torch.arange(50.0), 5, 1e-3)
    assert low[-1] == 1.0 and low[:-1].max() < 1e-6
    with pytest.raises(ValueError):
        DF.soft_topk_weights(alpha, 5, 0.0)
