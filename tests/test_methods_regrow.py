import itertools
import math

import pytest
import torch
from _methods_common import run_steps, tiny_vit
from torch import nn

from dynadiag.methods.density import num_kept
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.regrow import RegrowSchedule, drop_and_grow
from dynadiag.methods.rigl import RigLMethod
from dynadiag.methods.set import SETMethod


def test_schedule_update_steps_and_cosine_decay():
    schedule = RegrowSchedule(delta_t=100, drop_fraction=0.3, t_end=0.75, total_steps=1000)
    updates = [s for s in range(1000) if schedule.is_update_step(s)]
    assert updates == [99, 199, 299, 399, 499, 599, 699]  # after 100, ..., 700 steps; none from step 750 on
    assert schedule.fraction(99) == pytest.approx(0.15 * (1 + math.cos(math.pi * 100 / 750)))
    assert schedule.fraction(749) == 0.0 and schedule.fraction(900) == 0.0
    fractions = [schedule.fraction(s) for s in updates]
    assert all(a > b for a, b in itertools.pairwise(fractions))
    constant = RegrowSchedule(delta_t=10, drop_fraction=0.2, decay="constant", total_steps=100)
    assert constant.fraction(9) == constant.fraction(59) == 0.2
    linear = RegrowSchedule(delta_t=10, drop_fraction=0.2, t_end=0.5, decay="linear", total_steps=100)
    assert linear.fraction(24) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay"):
        RegrowSchedule(decay="sine")
    with pytest.raises(ValueError, match="t_end"):
        RegrowSchedule(t_end=75)


def test_drop_and_grow_keeps_count_and_follows_scores():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    weight = torch.tensor([0.9, 0.1, 0.5, 0.05, 0, 0, 0, 0])
    grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 3.0, 0.2, 2.0])
    new, grown = drop_and_grow(mask, weight.abs(), grad.abs(), 2)
    assert new.tolist() == [True, False, True, False, False, True, False, True]
    assert grown.tolist() == [False, False, False, False, False, True, False, True]
    # a just-dropped entry with the largest gradient is grown back (RigL allows it) and counted as grown
    grad[1] = 10.0
    new, grown = drop_and_grow(mask, weight.abs(), grad.abs(), 2)
    assert new.tolist() == [True, True, True, False, False, True, False, False] and grown[1] and grown[5]
    assert int(new.sum()) == 4


def test_rigl_grows_where_the_dense_gradient_is_largest():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4, bias=False)
    model = nn.Sequential()
    model.add_module("fc", layer)
    method = RigLMethod(
        MaskSparsifyConfig(0.5, include=["fc"], head="sparse", first_layer="sparse"),
        RegrowSchedule(delta_t=1, drop_fraction=0.5, t_end=1.0, decay="constant"),
    )
    method.apply_(model)
    method.bind(steps_per_epoch=10, total_steps=10)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    layer.weight_mask.copy_(mask)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 0.1, 0, 0], [3.0, 0.2, 0, 0], [2.0, 0.3, 0, 0], [1.0, 0.4, 0, 0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    grad = torch.tensor([[0.0, 0.0, 5.0, 0.1], [0.0, 0.0, 0.2, 6.0], [0.0, 0.0, 7.0, 0.3], [0.0, 0.0, 0.4, 8.0]])
    layer.weight.grad = grad.clone()
    method.on_after_backward(0, model, optimizer)
    assert torch.equal(layer.weight.grad, grad * mask)  # inactive gradients are zeroed after RigL read them
    optimizer.step()  # lr 0: weights unchanged, momentum buffer = masked grad
    metrics = method.on_after_optimizer_step(0, model, optimizer)
    expected = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(layer.weight_mask, expected)
    assert metrics["rigl/num_regrown"] == 4 and metrics["rigl/num_new"] == 4
    assert torch.equal(layer.weight[:, 0], torch.tensor([4.0, 3.0, 2.0, 1.0]))  # kept weights untouched
    assert int((layer.weight != 0).sum()) == 4  # grown weights start at zero
    assert optimizer.state[layer.weight]["momentum_buffer"].abs().sum() == 0  # changed entries' state reset


def _sparsity_checker(method, expected_updates):
    seen = []

    def check(step, metrics):
        for name, module in method.layers:
            assert int(module.weight_mask.sum()) == num_kept(module.weight.numel(), method.densities[name]), name
            assert torch.all(module.weight[~module.weight_mask] == 0), name
        if f"{method.name}/num_regrown" in metrics:
            seen.append(step)
            assert metrics[f"{method.name}/num_regrown"] > 0
            assert metrics["sparsity/mask"] == pytest.approx(method.sparsity, abs=2e-3)
            assert metrics["sparsity/effective"] >= metrics["sparsity/mask"]

    return check, seen


@pytest.mark.parametrize(
    ("cls", "distribution", "reset_state"),
    [(SETMethod, "uniform", "all"), (RigLMethod, "erk", "all"), (RigLMethod, "uniform", "momentum")],
)
def test_drop_grow_training_keeps_sparsity_and_zeros(cls, distribution, reset_state):
    model = tiny_vit()
    method = cls(
        MaskSparsifyConfig(0.9, distribution=distribution),
        RegrowSchedule(delta_t=2, t_end=0.75),
        reset_state=reset_state,
    )
    method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks = {n: m.weight_mask.clone() for n, m in method.layers}
    check, seen = _sparsity_checker(method, None)

    def optimizer_kept_zeros(step):
        # masked gradients and reset optimizer state: AdamW alone leaves every masked weight at exactly zero
        for name, module in method.layers:
            assert torch.all(module.weight[~module.weight_mask] == 0), (name, step)

    run_steps(model, method, optimizer, 12, after_step=check, after_optimizer=optimizer_kept_zeros)
    assert seen == [1, 3, 5, 7]  # updates after 2, 4, 6, 8 steps; t_end = 9 steps
    assert any(not torch.equal(masks[n], m.weight_mask) for n, m in method.layers)
    for _, module in method.layers:
        state = optimizer.state[module.weight]
        assert torch.all(state["exp_avg"][~module.weight_mask] == 0)


def test_set_regrowth_is_seeded_by_step():
    def final_masks(seed):
        torch.manual_seed(0)
        model = tiny_vit()
        method = SETMethod(MaskSparsifyConfig(0.8), RegrowSchedule(delta_t=1, t_end=1.0), seed=seed)
        method.apply_(model)
        method.bind(steps_per_epoch=3, total_steps=3)
        torch.manual_seed(1)  # the same data and initial weights for both runs
        run_steps(model, method, torch.optim.SGD(model.parameters(), lr=0.1), 3)
        return [m.weight_mask.clone() for _, m in method.layers]

    a, b, c = final_masks(0), final_masks(0), final_masks(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def _one_layer(method_cls, weight, mask, drop_fraction, **kwargs):
    """A bias-free 4x4 linear layer under ``method_cls`` with the given weight and mask, updating after every step."""
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(*reversed(weight.shape), bias=False))
    method = method_cls(
        MaskSparsifyConfig(1 - mask.float().mean().item(), include=["fc"], head="sparse", first_layer="sparse"),
        RegrowSchedule(delta_t=1, drop_fraction=drop_fraction, t_end=1.0, decay="constant"),
        **kwargs,
    )
    method.apply_(model)
    method.bind(steps_per_epoch=10, total_steps=10)
    model.fc.weight_mask.copy_(mask)
    with torch.no_grad():
        model.fc.weight.copy_(weight * mask)
    return model, method


def test_rigl_update_drops_and_grows_exactly_the_named_entries():
    # 8 active weights, drop fraction 0.25 -> the 2 smallest |w| among the active ones go: (0, 1) and (2, 0).
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.9, 0.05, 0, 0], [-0.8, 0.7, 0, 0], [0.01, -0.6, 0, 0], [0.5, 0.4, 0, 0]])
    # The 2 largest |dense gradient| among the entries not kept: (3, 3) = -9 and the just-dropped (2, 0) = 8;
    # active entries' gradients (even larger) must not count.
    grad = torch.tensor([[50.0, 0.1, 1.0, 2.0], [50.0, 50.0, 3.0, 0.5], [8.0, 50.0, 0.2, 0.3], [50.0, 50.0, 4.0, -9.0]])
    model, method = _one_layer(RigLMethod, weight, mask, 0.25)
    layer = model.fc
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    layer.weight.grad = grad.clone()
    method.on_after_backward(0, model, optimizer)
    optimizer.step()  # lr 0: weights unchanged, Adam moments = f(masked gradient)
    metrics = method.on_after_optimizer_step(0, model, optimizer)

    expected = mask.clone()
    expected[0, 1] = False  # dropped
    expected[3, 3] = True  # grown
    assert torch.equal(layer.weight_mask, expected)  # (2, 0) was dropped and grown back: still active
    assert metrics["rigl/num_regrown"] == 2 and metrics["rigl/num_new"] == 1
    assert layer.weight[3, 3] == 0 and layer.weight[0, 1] == 0  # the new connection starts at zero
    # the dropped-and-regrown weight was never off: it keeps its value and Adam state (RigL's reinit_when_same=False)
    assert layer.weight[2, 0].item() == pytest.approx(0.01)
    state = optimizer.state[layer.weight]
    assert state["exp_avg"][2, 0] != 0 and state["exp_avg_sq"][2, 0] != 0
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][0, 1] == 0 and state[key][3, 3] == 0  # dropped and new entries lose their state
    keep = mask & expected
    assert torch.equal(layer.weight[keep], (weight * mask)[keep])  # kept weights untouched


def test_momentum_only_reset_keeps_second_moments():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.9, 0.05, 0, 0], [-0.8, 0.7, 0, 0], [0.01, -0.6, 0, 0], [0.5, 0.4, 0, 0]])
    grad = torch.tensor([[1.0, 2.0, 1.0, 2.0], [1.0, 1.0, 3.0, 0.5], [1.0, 1.0, 0.2, 0.3], [1.0, 1.0, 4.0, -9.0]])
    model, method = _one_layer(RigLMethod, weight, mask, 0.25, reset_state="momentum")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    model.fc.weight.grad = grad.clone()
    method.on_after_backward(0, model, optimizer)
    optimizer.step()
    v_before = optimizer.state[model.fc.weight]["exp_avg_sq"].clone()
    method.on_after_optimizer_step(0, model, optimizer)
    state = optimizer.state[model.fc.weight]
    changed = mask ^ model.fc.weight_mask  # dropped (0, 1) and (2, 0), grown (3, 3) and (3, 2)
    assert int(changed.sum()) == 4
    assert torch.all(state["exp_avg"][changed] == 0)
    assert torch.equal(state["exp_avg_sq"], v_before) and state["exp_avg_sq"][0, 1] > 0
    with pytest.raises(ValueError, match="reset_state"):
        RigLMethod(MaskSparsifyConfig(0.9), reset_state="some")


def test_set_update_drops_the_smallest_magnitudes_and_grows_at_random():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.9, 0.05, 0, 0], [-0.8, 0.7, 0, 0], [0.01, -0.6, 0, 0], [0.5, 0.4, 0, 0]])
    model, method = _one_layer(SETMethod, weight, mask, 0.25, seed=4)
    layer = model.fc
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    layer.weight.grad = torch.ones(4, 4)
    method.on_after_backward(0, model, optimizer)
    optimizer.step()
    method.on_after_optimizer_step(0, model, optimizer)
    new = layer.weight_mask
    # drop: the 2 smallest |w| among the active weights, (0, 1) = 0.05 and (2, 0) = 0.01
    kept = mask.clone()
    kept[0, 1] = kept[2, 0] = False
    # grow: the 2 best random scores among the entries not kept (just-dropped ones included); the seed and step
    # fix the draw, so the method's own score for this step names them
    candidates = torch.where(kept, -1.0, method.grow_score("fc", layer, 0))
    assert torch.equal(new, kept | (candidates >= candidates.flatten().topk(2).values[-1]))
    assert int(new.sum()) == 8
    assert torch.all(layer.weight[new & ~mask] == 0)


def test_num_updates_spreads_updates_over_any_run_length():
    for total in (100, 440, 880, 10_000):
        schedule = RegrowSchedule(num_updates=15, t_end=0.75, total_steps=total)
        updates = [s for s in range(total) if schedule.is_update_step(s)]
        assert len(updates) == 15, total
        end = int(0.75 * total)
        assert [s + 1 for s in updates] == [math.ceil(k * end / 16) for k in range(1, 16)], total
    tiny = RegrowSchedule(num_updates=15, t_end=0.75, total_steps=10)  # 7 steps before t_end: one per step
    assert [s for s in range(10) if tiny.is_update_step(s)] == list(range(6))
    every7 = RegrowSchedule(delta_t=7, total_steps=100)  # delta_t when num_updates is unset
    assert [s + 1 for s in range(100) if every7.is_update_step(s)] == list(range(7, 75, 7))
    with pytest.raises(ValueError, match="num_updates"):
        RegrowSchedule(num_updates=0)
