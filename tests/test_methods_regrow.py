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


@pytest.mark.parametrize("cls", [SETMethod, RigLMethod])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_drop_grow_training_keeps_sparsity_and_zeros(cls, distribution):
    model = tiny_vit()
    method = cls(MaskSparsifyConfig(0.9, distribution=distribution), RegrowSchedule(delta_t=2, t_end=0.75))
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
