"""Sparse DynaDiag: candidate schedule, drop/grow, hardening to exactly K, freeze without a jump, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _methods_common import IMG, run_steps, tiny_vit

from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.functional import num_active_diagonals
from dynadiag.groups import group_offsets, input_permutation
from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod, candidate_count
from dynadiag.sparsify import DiagSparsifyConfig


def test_candidate_schedule_starts_at_c_k_and_reaches_k_at_the_freeze():
    counts = [candidate_count(10, 100, 3.0, done, 50) for done in range(0, 60)]
    assert counts[0] == 30 and counts[49] == 11 and counts[50] == 10 and counts[-1] == 10
    assert all(a >= b for a, b in itertools.pairwise(counts))  # never grows
    assert candidate_count(10, 20, 4.0, 0, 50) == 20  # capped at P
    assert candidate_count(10, 100, 1.0, 0, 50) == 10  # c = 1: the hard set from the start


def make(steps=12, group=1, permute=False, backend="reference", **kw):
    torch.manual_seed(0)
    model = tiny_vit()
    kw = {"density_start": 3.0, "freeze_fraction": 0.75, "delta_t": 2} | kw
    config = DiagSparsifyConfig(0.8, backend=backend, group=group, permute=permute)
    method = SparseDynaDiagMethod(config, **kw)
    method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return model, method, optimizer


@pytest.mark.parametrize("drop_score", ["magnitude", "alpha"])
def test_layers_run_candidates_grow_new_diagonals_and_end_with_exactly_k(drop_score):
    model, method, optimizer = make(drop_score=drop_score)
    assert method.freeze_step == 9
    layers = [m for m in model.modules() if isinstance(m, CandidateDiagLinear)]
    assert len(layers) == 8 and all(not isinstance(m.alpha, torch.nn.Parameter) for m in layers)
    assert all(int(m.candidates.sum()) == min(m.num_diagonals, 3 * m.k) for m in layers)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(m.alpha) not in held for m in layers)
    start = {id(m): m.candidates.clone() for m in layers}
    seen, hardness = [], []

    def check(step, metrics):
        if "sparse_dynadiag/num_new" in metrics:
            seen.append((step, metrics["sparse_dynadiag/num_new"]))
            for m in layers:
                assert m.k <= int(m.candidates.sum()) <= min(m.num_diagonals, 3 * m.k)

    alphas_before = [m.alpha.detach().clone() for m in layers]

    def record(step):  # after the optimizer step, before the method's hook (which freezes at step 8)
        hardness.append(None if layers[0].is_frozen else layers[0].hardness)

    run_steps(model, method, optimizer, 12, after_step=check, after_optimizer=record)
    assert [s for s, _ in seen] == [1, 3, 5, 7]  # every delta_t steps before the freeze (step 9)
    assert sum(n for _, n in seen) > 0  # diagonals from outside the initial candidate set entered
    assert any(not torch.equal(start[id(m)], m.candidates) for m in layers)
    assert hardness[0] == 0.0 and hardness[8] == 1.0 and hardness[9] is None  # exactly hard on the last soft step
    assert any(not torch.equal(a, m.alpha) for a, m in zip(alphas_before, layers, strict=True))  # alpha trained
    for m in layers:
        assert m.is_frozen and m.offsets.numel() == m.k and m.V.shape == (m.k, m.diag_length)
        assert bool(m.candidates[m.offsets].all())  # kept diagonals come from the candidate set
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(m.V) in held for m in layers)


@pytest.mark.parametrize(("group", "grow_init"), [(1, "zero"), (2, "zero"), (5, "zero"), (1, "keep")])
def test_stable_params_keep_the_parameter_objects_and_train_as_the_compact_layout(group, grow_init):
    """The stable layout changes rows in place: same V object from apply_ to the freeze, and the same run."""
    compact, compact_method, compact_opt = make(group=group, grow_init=grow_init, stable_params=False)
    model, method, optimizer = make(group=group, grow_init=grow_init)
    layers = [m for _, m in method.layers]
    params = [m.V for m in layers]
    assert all(m.is_stable and m.V.shape[0] == min(m.num_diagonals, 3 * m.k_groups * group) for m in layers)
    changes = []

    def check(step, metrics):
        changes.append(method.topology_changed)
        method.topology_changed = False
        for m, p in zip(layers, params, strict=True):
            if not m.is_frozen:
                assert m.V is p  # never replaced before the freeze
                free = m.slots < 0
                assert int((~free).sum()) == m.candidate_offsets().numel() and not m.V[free].any()
                assert torch.equal(m.slots[m.slots >= 0].sort().values, m.candidate_offsets())
                for value in optimizer.state[m.V].values():
                    assert value.dim() == 0 or not value[free].any()  # free rows hold no optimizer state

    torch.manual_seed(1)  # the same batches for both runs
    run_steps(compact, compact_method, compact_opt, 12)
    torch.manual_seed(1)
    run_steps(model, method, optimizer, 12, after_step=check)
    assert not any(changes[:8]) and changes[8]  # only the freeze (step 8) replaces V
    for (name, a), (_, b) in zip(compact_method.layers, method.layers, strict=True):
        assert torch.equal(a.offsets, b.offsets), name
        torch.testing.assert_close(a.V, b.V, rtol=1e-5, atol=1e-6)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}


def test_stable_checkpoint_loads_mid_soft_phase_into_a_fresh_model():
    model, method, optimizer = make()
    run_steps(model, method, optimizer, 4)
    fresh, _, _ = make()
    fresh.load_state_dict(model.state_dict(), strict=True)
    compact, _, _ = make(stable_params=False)  # a compact model takes the stable checkpoint's layout
    compact.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    for other in (fresh, compact):
        for a, b in zip(model.modules(), other.modules(), strict=True):
            if isinstance(a, CandidateDiagLinear):  # runtime schedule state, set by on_step_start
                b.temperature, b.hardness = a.temperature, a.hardness
                assert b.is_stable and b.V.shape == a.V.shape
        other.eval()
        model.eval()
        torch.testing.assert_close(other(x), model(x))


GROUPED = [(1, False), (4, True), (5, False), (7, True)]  # g = 5, 7 divide no P of tiny_vit: short last groups


@pytest.mark.parametrize(("group", "grow_init"), [(1, "zero"), (2, "zero"), (1, "keep")])
def test_v_stores_the_candidates_only_and_the_optimizer_follows(group, grow_init):
    model, method, optimizer = make(group=group, grow_init=grow_init, stable_params=False)  # the compact layout
    layers = [m for _, m in method.layers]
    changes = []

    def check(step, metrics):
        changes.append(method.topology_changed)
        method.topology_changed = False  # what the trainer does after rebuilding its wrappers
        held = [p for g in optimizer.param_groups for p in g["params"]]
        for m in layers:
            assert any(p is m.V for p in held)  # the optimizer trains the current V, not a retired one
            rows = m.offsets.numel() if m.is_frozen else m.candidate_offsets().numel()
            assert m.V.shape == (rows, m.diag_length)  # K' rows during the soft phase, K after the freeze
            for value in optimizer.state[m.V].values():
                assert value.dim() == 0 or value.shape == m.V.shape
        assert sum(p.numel() for p in held) == sum(p.numel() for p in model.parameters())

    run_steps(model, method, optimizer, 12, after_step=check)
    assert changes[1] and changes[8]  # the first candidate update (step 1) and the freeze (step 8) replace V
    assert all(m.is_frozen and m.offsets.numel() == m.k for m in layers)


@pytest.mark.parametrize(("group", "permute"), GROUPED)
def test_freeze_changes_nothing(group, permute):
    model, method, optimizer = make(group=group, permute=permute)
    run_steps(model, method, optimizer, 8)  # steps 0-7; step 8 is the last soft step
    x = torch.randn(3, 3, IMG, IMG)
    method.on_step_start(8, model)
    model.eval()
    before = model(x)
    assert method.will_freeze(8, model)
    metrics = method.on_after_optimizer_step(8, model, optimizer)  # no optimizer step in between: freeze only
    assert metrics == {"frozen": 1.0} and method.topology_changed
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not method.will_freeze(9, model)


@pytest.mark.parametrize(("group", "permute"), GROUPED)
def test_frozen_checkpoint_loads_into_a_freshly_applied_model(group, permute):
    model, method, optimizer = make(group=group, permute=permute)
    run_steps(model, method, optimizer, 12)
    fresh_model, _fresh_method, _ = make(group=group, permute=permute)
    fresh_model.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh_model.eval()
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(fresh_model(x), model(x))


def test_swap_rounding_ceil_keeps_exploring_where_floor_stops():
    """Few kept units (groups of 5 here): ``floor`` swaps none once ``fraction * k < 1``; ``ceil`` swaps one per
    update until the freeze."""
    method = SparseDynaDiagMethod(DiagSparsifyConfig(0.9), swap_rounding="ceil")
    assert [method.swap_count(f, 4) for f in (0.3, 0.25, 0.1, 0.0)] == [2, 1, 1, 0]
    assert [SparseDynaDiagMethod(DiagSparsifyConfig(0.9)).swap_count(f, 4) for f in (0.3, 0.25, 0.1)] == [1, 1, 0]
    grown = {}
    for rounding in ("floor", "ceil"):
        model, method, optimizer = make(group=5, swap_rounding=rounding)
        layers = [m for m in model.modules() if isinstance(m, CandidateDiagLinear)]
        grown[rounding] = []

        def check(step, metrics, out=grown[rounding]):
            if "sparse_dynadiag/num_grown" in metrics:
                out.append(metrics["sparse_dynadiag/num_grown"])

        run_steps(model, method, optimizer, 12, after_step=check)
        assert all(m.is_frozen and m.offsets.numel() == m.k for m in layers)
    assert len(grown["floor"]) == len(grown["ceil"]) == 4
    assert grown["floor"][-1] == 0  # the last update before the freeze: int(fraction * k) == 0 everywhere
    assert all(n >= len(layers) for n in grown["ceil"])  # at least one unit per layer at every update


@pytest.mark.parametrize(
    "bad", [{"density_start": 0.5}, {"drop_score": "x"}, {"freeze_fraction": 0.0}, {"swap_rounding": "round"}]
)
def test_bad_options_fail_clearly(bad):
    with pytest.raises(ValueError):
        SparseDynaDiagMethod(DiagSparsifyConfig(0.9), **bad)


@pytest.mark.parametrize(
    ("stop_at", "group", "permute"), [(3, 1, False), (10, 1, False), (3, 4, True)]
)  # mid-soft-phase (mid-epoch, alpha optimizer state live) and after the freeze
def test_trainer_resume_mid_soft_phase_is_exact(tmp_path, stop_at, group, permute):
    from tests.test_trainer import make_trainer

    def method():
        config = DiagSparsifyConfig(0.8, backend="reference", group=group, permute=permute)
        return SparseDynaDiagMethod(config, density_start=2.0, freeze_fraction=0.5, delta_t=2)

    full = make_trainer(tmp_path / "full", method=method(), epochs=3)
    full_summary = full.fit()
    assert full_summary["freeze_drop"] == pytest.approx(0.0, abs=1e-9)  # hard by the freeze: nothing changes
    assert full_summary["topk_share_at_freeze"] == pytest.approx(1.0)
    first = make_trainer(tmp_path / "part", method=method(), epochs=3, max_steps=stop_at)
    first.fit()
    resumed = make_trainer(tmp_path / "part", method=method(), epochs=3)
    summary = resumed.fit(resume=str(tmp_path / "part" / "checkpoints" / "last.pt"))
    assert summary["val_loss_final"] == full_summary["val_loss_final"]
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key


def test_label_names_a_variant_row():
    assert SparseDynaDiagMethod(DiagSparsifyConfig(0.9)).name == "sparse_dynadiag"
    model, method, optimizer = make(label="sparse_dynadiag_norm", normalize=True)
    assert method.name == "sparse_dynadiag_norm"
    seen = []
    run_steps(model, method, optimizer, 2, after_step=lambda step, metrics: seen.extend(metrics))
    assert "sparse_dynadiag_norm/num_new" in seen


# ---------------------------------------------------------------------------------------------- grouped, permuted
@pytest.mark.parametrize(("group", "permute"), GROUPED[1:])
def test_grouped_layers_select_whole_groups_and_end_with_exactly_k_groups(group, permute):
    model, method, optimizer = make(group=group, permute=permute)
    layers = [m for _, m in method.layers]
    assert len(layers) == 8 and all(m.group == group for m in layers)
    for name, m in method.layers:
        assert m.alpha.shape == (m.num_groups,) and m.candidates.shape == (m.num_groups,)
        assert int(m.candidates.sum()) == min(m.num_groups, 3 * m.k_groups)  # c * K_groups candidate groups
        k = num_active_diagonals(m.in_features, m.out_features, 0.8)
        assert m.num_groups == math.ceil(m.num_diagonals / group)
        assert m.k_groups == min(m.num_groups, math.ceil(k / group))
        if permute:  # the permutation sparsify_ draws from the seed and the layer's name
            assert torch.equal(m.perm, input_permutation(m.in_features, 0, name))
        else:
            assert m.perm is None
    counts, new = [], []

    def check(step, metrics):
        if "sparse_dynadiag/num_new" in metrics:
            new.append(metrics["sparse_dynadiag/num_new"])
            counts.append([int(m.candidates.sum()) for m in layers])
            for m in layers:
                assert m.k_groups <= int(m.candidates.sum())

    run_steps(model, method, optimizer, 12, after_step=check)
    assert sum(new) > 0  # groups from outside the initial candidate set entered
    assert all(a >= b for a, b in itertools.pairwise(c[0] for c in counts))  # the candidate set only shrinks
    for m in layers:
        groups = (m.offsets // group).unique()
        assert m.is_frozen and groups.numel() == m.k_groups  # exactly K_groups whole groups
        assert torch.equal(m.offsets, group_offsets(groups, m.num_diagonals, group))
        assert bool(m.candidates[groups].all())  # kept groups come from the candidate set
        assert m.k == m.offsets.numel() and m.V.shape == (m.k, m.diag_length)
        assert m.achieved_sparsity == 1 - m.offsets.numel() / m.num_diagonals


def test_k_groups_is_ceil_k_over_g_capped_at_g():
    _, method, _ = make(group=5)
    by_name = dict(method.layers)
    qkv, proj = by_name["blocks.0.attn.qkv"], by_name["blocks.0.attn.proj"]
    # K at 80 %: qkv 32->96: ceil(614 / 32) = 20 -> 4 of ceil(96/5) = 20 groups; proj 32->32: ceil(204/32) = 7 -> 2 of 7
    assert (qkv.num_groups, qkv.k_groups, proj.num_groups, proj.k_groups) == (20, 4, 7, 2)


def test_a_group_that_does_not_fit_fails_clearly():
    with pytest.raises(ValueError, match=r"^sparse_dynadiag: group=32 does not fit layer 'blocks.0.attn.proj'"):
        make(group=32)  # proj has P = 32 diagonals: one group, kept whole, nothing to select
    with pytest.raises(ValueError, match="group must be a positive integer"):
        make(group=0)


def test_trainer_run_grouped_permuted_reports_the_achieved_sparsity(tmp_path):
    from tests.test_trainer import make_trainer

    config = DiagSparsifyConfig(0.8, backend="reference", group=4, permute=True)
    method = SparseDynaDiagMethod(config, density_start=2.0, freeze_fraction=0.5, delta_t=2)
    trainer = make_trainer(tmp_path, method=method, epochs=2)
    summary = trainer.fit()
    layers = [m for _, m in method.layers]
    assert all(m.is_frozen and (m.offsets // 4).unique().numel() == m.k_groups for m in layers)
    nnz = sum(m.offsets.numel() * m.diag_length for m in layers)
    dense = sum(m.in_features * m.out_features for m in layers)
    assert summary["sparsity_target_layers"] == pytest.approx(1 - nnz / dense)  # the diagonal layers, as kept
    assert summary["sparsity_target_layers"] < 0.8  # whole groups keep more than K diagonals here
    others = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert summary["nnz"] == nnz + sum(int(m.weight.count_nonzero()) for m in others)
    assert summary["sparsity_effective"] == pytest.approx(1 - summary["nnz"] / summary["dense_weights"])
    assert summary["freeze_drop"] == pytest.approx(0.0, abs=1e-9) and summary["topk_share_at_freeze"] == 1.0


# What the ungrouped method kept in this 12-step run (tiny_vit, seed 0, reference backend, 1 thread) before grouped
# support existed (commit f1c18ee, the code of the sparse DynaDiag study's runs). The group=1 path must keep doing
# exactly this: the whole state dict and the candidate set after every step were compared bit for bit (both
# `reference` and `cpu`) when grouped support landed; this pins the selection (exact) and the trained values (sums,
# to 1e-5).
G1_OFFSETS = {
    "blocks.0.attn.qkv": [7, 17, 21, 23, 26, 31, 37, 47, 50, 51, 54, 64, 68, 69, 71, 73, 74, 75, 81, 82],
    "blocks.0.attn.proj": [4, 5, 15, 17, 18, 24, 27],
    "blocks.0.mlp.fc1": [2, 6, 12, 13, 14, 18, 28, 42, 44, 47, 50, 54, 62, 63, 73, 77, 79, 90, 93, 97, 103, 105, 106,
                         113, 118, 124],
    "blocks.0.mlp.fc2": [7, 12, 20, 27, 29, 59, 68, 69, 70, 76, 80, 81, 82, 83, 86, 89, 95, 107, 109, 110, 120, 121,
                         122, 123, 124, 127],
    "blocks.1.attn.qkv": [1, 3, 5, 11, 12, 15, 16, 19, 22, 23, 25, 28, 35, 48, 59, 61, 66, 68, 71, 87],
    "blocks.1.attn.proj": [5, 14, 18, 19, 23, 24, 31],
    "blocks.1.mlp.fc1": [14, 18, 19, 33, 37, 40, 53, 56, 58, 63, 67, 76, 77, 79, 81, 85, 86, 87, 91, 94, 100, 103, 106,
                         109, 114, 118],
    "blocks.1.mlp.fc2": [5, 7, 12, 17, 25, 29, 35, 40, 45, 53, 56, 59, 67, 69, 74, 79, 80, 86, 91, 95, 102, 105, 113,
                         121, 123, 127],
}  # fmt: skip
G1_ABS_SUMS = {
    "blocks.0.attn.qkv": 57.706213573459536,
    "blocks.0.attn.proj": 21.489196353883017,
    "blocks.0.mlp.fc1": 78.4958020686172,
    "blocks.0.mlp.fc2": 75.75978600233793,
    "blocks.1.attn.qkv": 61.17115773074329,
    "blocks.1.attn.proj": 21.50466183689423,
    "blocks.1.mlp.fc1": 72.369577440375,
    "blocks.1.mlp.fc2": 75.61898181447759,
}


def test_ungrouped_run_is_what_it_was_before_groups():
    model, method, optimizer = make()
    run_steps(model, method, optimizer, 12)
    assert {name: m.offsets.tolist() for name, m in method.layers} == G1_OFFSETS
    sums = {name: float(m.V.detach().double().abs().sum()) for name, m in method.layers}
    assert sums == pytest.approx(G1_ABS_SUMS, rel=1e-5)
