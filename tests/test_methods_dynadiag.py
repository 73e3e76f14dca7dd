"""DynaDiagMethod: the temperature it sets at every step (by value, per step and per epoch), the freeze and what
the optimizer holds afterwards, and the exact sparsity of the converted layers."""

import math

import pytest
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag.functional import num_active_diagonals
from dynadiag.methods.dynadiag import DynaDiagMethod, diagonal_layers
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig

TARGETS = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def _model():
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(nn.Module()))
    block = model.blocks[0]
    block.mlp = nn.Module()
    block.mlp.fc1 = nn.Linear(12, 20)
    block.mlp.fc2 = nn.Linear(20, 12)
    model.blocks[0].forward = lambda x: block.mlp.fc2(torch.relu(block.mlp.fc1(x)))
    return model


def _cosine(step: float, end: int, t_max: float, t_min: float) -> float:
    """The cosine annealing written out independently of dynadiag.schedules."""
    return t_min + 0.5 * (t_max - t_min) * (1 + math.cos(math.pi * min(step, end) / end))


def _train(method, model, steps):
    """The trainer's hook order on random data; returns the temperature each step started with (None once frozen)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    temps, frozen_at = [], None
    for step in range(steps):
        temps.append(method.on_step_start(step, model).get("temperature"))
        loss = model(torch.randn(8, 12)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        method.on_after_backward(step, model, opt)
        opt.step()
        if method.on_after_optimizer_step(step, model, opt) == {"frozen": 1.0}:
            frozen_at = step
    return temps, frozen_at, opt


@pytest.mark.parametrize("per_epoch", [False, True])
def test_temperature_each_step_and_the_freeze(per_epoch):
    model = _model()
    schedule = TemperatureSchedule(t_max=4.0, t_min=0.1, freeze_epoch=2, per_epoch=per_epoch)
    method = DynaDiagMethod(DiagSparsifyConfig(0.75, include=TARGETS), schedule)
    method.bind(steps_per_epoch=5, total_steps=20)
    assert method.freeze_step == 10
    method.apply_(model)
    temps, frozen_at, opt = _train(method, model, 20)
    # per step: the cosine at the step; per epoch: the cosine at the first step of the step's epoch
    expected = [_cosine(s - s % 5 if per_epoch else s, 10, 4.0, 0.1) for s in range(10)]
    assert temps[:10] == pytest.approx(expected, rel=1e-12)
    assert temps[0] == 4.0 and all(t is None for t in temps[10:])  # frozen after step index 9: no more annealing
    assert frozen_at == 9 and method.topology_changed
    layers = diagonal_layers(model)
    assert len(layers) == 2 and all(layer.is_frozen for layer in layers)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for layer in layers:
        assert id(layer.V) in held and id(layer.alpha) not in held
        assert layer.V.shape == (layer.k, layer.diag_length)
        assert opt.state[layer.V]["exp_avg"].shape == layer.V.shape  # Adam moments carried over for kept rows


def test_default_schedule_by_value():
    """``DynaDiagMethod(config)`` anneals by cosine from 5 to 0.05 per step and freezes at 20 % of the run."""
    method = DynaDiagMethod(DiagSparsifyConfig(0.9))
    method.bind(steps_per_epoch=10, total_steps=100)
    assert method.freeze_step == 20
    assert [method.schedule(s) for s in (0, 10, 20, 60)] == pytest.approx([5.0, 2.525, 0.05, 0.05], rel=1e-12)
    assert method.schedule(5) == pytest.approx(_cosine(5, 20, 5.0, 0.05), rel=1e-12)


def test_freeze_epoch_beyond_run_is_rejected():
    method = DynaDiagMethod(DiagSparsifyConfig(0.9), TemperatureSchedule(freeze_epoch=50))
    with pytest.raises(ValueError, match="freeze_epoch=50 is beyond the run"):
        method.bind(steps_per_epoch=10, total_steps=100)
    fraction = DynaDiagMethod(DiagSparsifyConfig(0.9), TemperatureSchedule(freeze_fraction=1.5))
    with pytest.raises(ValueError, match="freeze_epoch=15 is beyond the run"):
        fraction.bind(steps_per_epoch=10, total_steps=100)


def test_layers_are_diaglinear_at_the_exact_sparsity():
    model = _model()
    report = DynaDiagMethod(DiagSparsifyConfig(0.5, include=TARGETS)).apply_(model)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    assert isinstance(fc1, DiagLinear) and isinstance(fc2, DiagLinear)
    for layer in (fc1, fc2):  # P = 20 diagonals of length D = 12; K = ceil(int(0.5 * 240) / 12) = 10
        assert (layer.num_diagonals, layer.k) == (20, num_active_diagonals(12, 20, 0.5)) == (20, 10)
        assert layer.achieved_sparsity == 1 - 10 / 20
    assert report.sparsity == 0.5
