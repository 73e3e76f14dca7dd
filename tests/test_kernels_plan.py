"""The v2 CUDA kernels' host-side plan (dynadiag.kernels.plan), checked on CPU against the reference index map."""

import pytest
import torch

from dynadiag.functional import diag_index, place_diagonals
from dynadiag.kernels.plan import emulate_apply, pack_values, plan_apply

# (in, out, K, tile, wmax): odd shapes, tall/wide/square, tiny layers narrower than a tile, one diagonal, all
# diagonals, windows that force many chunks (wmax = tile) and windows that hold the whole row.
CASES = [
    (37, 37, 5, 64, 64),
    (37, 37, 5, 64, 4096),
    (20, 48, 7, 32, 40),
    (48, 20, 7, 32, 40),
    (13, 101, 9, 64, 80),
    (101, 13, 9, 64, 80),
    (1, 7, 3, 32, 32),
    (7, 1, 7, 32, 32),
    (70, 70, 70, 64, 100),
    (97, 131, 1, 32, 50),
    (200, 136, 17, 128, 300),
    (136, 200, 17, 128, 300),
]


def _problem(in_f, out_f, k, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values
    values = torch.randn(k, length, generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x, values, offsets


def _pattern(plan, k_count, D):
    """(output, source) pairs the plan computes, each with its diagonal element, as a set (asserting no repeats)."""
    seen = {}
    for t in range(plan.tile_chunks.numel() - 1):
        for c in range(int(plan.tile_chunks[t]), int(plan.tile_chunks[t + 1])):
            begin, end, w0, _ = plan.chunks[c].tolist()
            for e in range(begin, end):
                for j in range(plan.tile):
                    flat = int(plan.vindex[e, j])
                    if flat < 0:
                        continue
                    r = t * plan.tile + j
                    src = (w0 + int(plan.shifts[e]) + j) % plan.L
                    key = (r, src)
                    assert key not in seen, f"output {r} reads source {src} twice"
                    seen[key] = (flat // D, flat % D)
                    assert flat // D == int(plan.diag[e])
    return seen


@pytest.mark.parametrize(("in_f", "out_f", "k", "tile", "wmax"), CASES)
def test_forward_plan_covers_exactly_the_reference_pattern(in_f, out_f, k, tile, wmax):
    _, _values, offsets = _problem(in_f, out_f, k)
    plan = plan_apply(offsets, in_f, out_f, out_f >= in_f, tile, wmax)  # forward: src = x [N, in], dst = y [N, out]
    rows, cols = diag_index(in_f, out_f, offsets)  # W[rows, cols] = values: y[:, row] += values * x[:, col]
    D = min(in_f, out_f)
    want = {(int(r), int(c)): (kk, t) for kk in range(k) for t, (r, c) in enumerate(zip(rows[kk], cols[kk]))}
    assert _pattern(plan, k, D) == want
    assert int(plan.chunks[:, 3].max()) <= max(wmax, plan.L + tile - 1) and plan.max_window <= wmax


@pytest.mark.parametrize(("in_f", "out_f", "k", "tile", "wmax"), CASES)
def test_emulated_forward_and_grad_x_match_reference(in_f, out_f, k, tile, wmax):
    x, values, offsets = _problem(in_f, out_f, k)
    weight = place_diagonals(values, offsets, in_f, out_f)  # [out, in]
    fwd = plan_apply(offsets, in_f, out_f, out_f >= in_f, tile, wmax)
    y = emulate_apply(x, pack_values(values, fwd), fwd)
    assert torch.allclose(y, x @ weight.T, atol=1e-12)
    # grad_x = grad_y W: the transposed pattern, i.e. the apply with A = out, B = in (the other form).
    grad_y = torch.randn(5, out_f, dtype=torch.float64)
    bwd = plan_apply(offsets, out_f, in_f, not fwd.tall, tile, wmax)
    assert torch.allclose(emulate_apply(grad_y, pack_values(values, bwd), bwd), grad_y @ weight, atol=1e-12)


def test_tall_tiles_skip_diagonals_that_cannot_reach_them():
    """fc1-like (out = 4 in): a diagonal covers in of the out rows, so a tile sees about a quarter of them."""
    _, _, offsets = _problem(64, 256, 40)
    plan = plan_apply(offsets, 64, 256, True, 32, 4096)
    entries_per_tile = plan.shifts.numel() / (plan.tile_chunks.numel() - 1)
    assert entries_per_tile < 0.5 * 40


def test_plan_without_diagonals_leaves_every_tile_empty():
    plan = plan_apply(torch.empty(0, dtype=torch.long), 40, 70, True, 32, 64)
    assert plan.shifts.numel() == 0 and plan.chunks.shape == (0, 4) and plan.max_window == 32
    assert plan.tile_chunks.tolist() == [0, 0, 0, 0]
    assert torch.equal(
        emulate_apply(torch.randn(3, 40), pack_values(torch.empty(0, 40), plan), plan), torch.zeros(3, 70)
    )


def test_plan_rejects_a_window_smaller_than_a_tile():
    with pytest.raises(ValueError, match="wmax"):
        plan_apply(torch.tensor([0, 3]), 16, 16, True, 32, 16)
    with pytest.raises(ValueError, match="tall form needs"):
        plan_apply(torch.tensor([0, 3]), 16, 8, True, 32, 64)
