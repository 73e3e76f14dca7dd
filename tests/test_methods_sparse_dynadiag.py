"""Sparse DynaDiag: candidate schedule, drop/grow, hardening to exactly K, freeze without a jump, resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from _methods_common import IMG, run_steps, tiny_vit

from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod, candidate_count


def test_candidate_schedule_starts_at_c_k_and_reaches_k_at_the_freeze():
    counts = [candidate_count(10, 100, 3.0, done, 50) for done in range(0, 60)]
    assert counts[0] == 30 and counts[49] == 11 and counts[50] == 10 and counts[-1] == 10
    assert all(a >= b for a, b in itertools.pairwise(counts))  # never grows
    assert candidate_count(10, 20, 4.0, 0, 50) == 20  # capped at P
    assert candidate_count(10, 100, 1.0, 0, 50) == 10  # c = 1: the hard set from the start


def make(steps=12, **kw):
    torch.manual_seed(0)
    model = tiny_vit()
    kw = {"density_start": 3.0, "freeze_fraction": 0.75, "delta_t": 2, "backend": "reference"} | kw
    method = SparseDynaDiagMethod(0.8, **kw)
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


def test_freeze_changes_nothing():
    model, method, optimizer = make()
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


def test_frozen_checkpoint_loads_into_a_freshly_applied_model():
    model, method, optimizer = make()
    run_steps(model, method, optimizer, 12)
    fresh_model, _fresh_method, _ = make()
    fresh_model.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh_model.eval()
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(fresh_model(x), model(x))


@pytest.mark.parametrize("bad", [{"density_start": 0.5}, {"drop_score": "x"}, {"freeze_fraction": 0.0}])
def test_bad_options_fail_clearly(bad):
    with pytest.raises(ValueError):
        SparseDynaDiagMethod(0.9, **bad)


@pytest.mark.parametrize("stop_at", [3, 10])  # mid-soft-phase (mid-epoch, alpha optimizer state live) and after
def test_trainer_resume_mid_soft_phase_is_exact(tmp_path, stop_at):
    from tests.test_trainer import make_trainer

    def method():
        return SparseDynaDiagMethod(0.8, density_start=2.0, freeze_fraction=0.5, delta_t=2, backend="reference")

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
    assert SparseDynaDiagMethod(0.9).name == "sparse_dynadiag"
    model, method, optimizer = make(label="sparse_dynadiag_norm", normalize=True)
    assert method.name == "sparse_dynadiag_norm"
    seen = []
    run_steps(model, method, optimizer, 2, after_step=lambda step, metrics: seen.extend(metrics))
    assert "sparse_dynadiag_norm/num_new" in seen
