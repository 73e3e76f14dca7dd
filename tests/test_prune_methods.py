import pytest
import torch
from torch import nn

from dynadiag.prune.calibration import InputStats, collect_input_stats
from dynadiag.prune.dsnot import dsnot_mask, expected_error
from dynadiag.prune.magnitude import magnitude_mask
from dynadiag.prune.wanda import per_row_mask, wanda_mask, wanda_scores


def _hand_made():
    """A 2x4 layer and 4 tokens whose feature norms are [5, 4, 1, 2]."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 0.5, -1.0, 2.0]]))
    x = torch.tensor([[3.0, 0, 0, 0], [4.0, 0, 0, 2.0], [0, 4.0, 0, 0], [0, 0, 1.0, 0]])
    return layer, x


def test_wanda_scores_hand_made_layer():
    layer, x = _hand_made()
    stats = collect_input_stats(layer, {"": layer}, [x[None]])[""]  # [1, 4 tokens, 4 features]
    torch.testing.assert_close(stats.norm, torch.tensor([5.0, 4.0, 1.0, 2.0], dtype=torch.float64))
    scores = wanda_scores(layer.weight, stats)
    expected = torch.tensor([[5.0, 8.0, 3.0, 1.0], [20.0, 2.0, 1.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    mask = wanda_mask(layer.weight, stats, 0.5)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, True]]
    # magnitude alone would keep a different set in row 0: the activations matter
    assert magnitude_mask(layer.weight, 0.5)[0].tolist() != mask[0].tolist()


def test_magnitude_mask_exact_count_and_order():
    w = torch.randn(16, 24)
    for sparsity in (0.0, 0.5, 0.9, 0.95):
        mask = magnitude_mask(w, sparsity)
        assert int((~mask).sum()) == round(sparsity * w.numel())
        if sparsity > 0:
            assert w[mask].abs().min() >= w[~mask].abs().max()
    # ties (all equal) still give the exact count
    assert int((~magnitude_mask(torch.ones(10, 10), 0.37)).sum()) == 37


def test_per_row_mask_equal_rows():
    mask = per_row_mask(torch.rand(7, 40), 0.9)
    assert (mask.sum(1) == 4).all()


def _layer_with_biased_inputs(out_f=24, in_f=48, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    mean = torch.randn(in_f, generator=g)  # non-zero input means: the expected error is not trivially 0
    scale = torch.rand(in_f, generator=g) * 2 + 0.1
    x = torch.randn(tokens, in_f, generator=g) * scale + mean
    stats = InputStats.zeros(in_f)
    stats.update(x)
    return weight, x, stats


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("same_sign", [True, False])
def test_dsnot_reduces_expected_error_and_keeps_sparsity(sparsity, same_sign):
    weight, x, stats = _layer_with_biased_inputs()
    initial = wanda_mask(weight, stats, sparsity)
    result = dsnot_mask(weight, initial, stats, same_sign=same_sign)
    # exact sparsity, row by row
    assert torch.equal(result.mask.sum(1), initial.sum(1))
    # never increases the error it optimises, for any row, and really improves it
    assert (result.error_after <= result.error_before).all()
    assert result.error_after.sum() < result.error_before.sum()
    assert result.swaps > 0
    # the tracked error is the real one: mean over the calibration tokens of y_dense - y_sparse
    direct = (x.double() @ (weight.double() * ~result.mask).t()).mean(0)
    torch.testing.assert_close(expected_error(weight, result.mask, stats), direct)
    torch.testing.assert_close(result.error_after, direct.abs())


def test_dsnot_error_monotone_in_cycles():
    weight, _, stats = _layer_with_biased_inputs(seed=1)
    initial = per_row_mask(weight.abs(), 0.8)  # magnitude start
    previous = expected_error(weight, initial, stats).abs()
    for cycles in (1, 2, 5, 10, 50):
        result = dsnot_mask(weight, initial, stats, max_cycles=cycles)
        assert (result.error_after <= previous + 1e-12).all()
        assert result.cycles <= cycles
        previous = result.error_after
        assert torch.equal(result.mask.sum(1), initial.sum(1))


def test_dsnot_threshold_stops_rows():
    weight, _, stats = _layer_with_biased_inputs(seed=2)
    initial = wanda_mask(weight, stats, 0.5)
    big = float(expected_error(weight, initial, stats).abs().max()) + 1.0
    result = dsnot_mask(weight, initial, stats, update_threshold=big)
    assert result.swaps == 0 and torch.equal(result.mask, initial)


def test_dsnot_rejects_bad_mask():
    weight, _, stats = _layer_with_biased_inputs()
    with pytest.raises(ValueError):
        dsnot_mask(weight, torch.ones(3, 3, dtype=torch.bool), stats)
