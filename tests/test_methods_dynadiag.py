import itertools

import pytest
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag.methods.dynadiag import DynaDiagMethod, diagonal_layers
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig


def _model():
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(nn.Module()))
    block = model.blocks[0]
    block.mlp = nn.Module()
    block.mlp.fc1 = nn.Linear(12, 20)
    block.mlp.fc2 = nn.Linear(20, 12)
    model.blocks[0].forward = lambda x: block.mlp.fc2(torch.relu(block.mlp.fc1(x)))
    return model


def test_method_hooks_anneal_and_freeze_with_optimizer_consistency():
    model = _model()
    method = DynaDiagMethod(
        DiagSparsifyConfig(0.75), TemperatureSchedule(t_max=4.0, t_min=0.1, freeze_epoch=2, per_epoch=False)
    )
    method.bind(steps_per_epoch=5, total_steps=20)
    report = method.apply_(model)
    assert len(report.layers) == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    temps = []
    for step in range(20):
        metrics = method.on_step_start(step, model)
        temps.append(metrics.get("temperature"))
        loss = model(torch.randn(8, 12)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        method.on_after_backward(step, model, opt)
        opt.step()
        out = method.on_after_optimizer_step(step, model, opt)
        if step == 9:
            assert out == {"frozen": 1.0} and method.topology_changed
            layers = diagonal_layers(model)
            assert all(layer.is_frozen for layer in layers)
            params = {id(p) for g in opt.param_groups for p in g["params"]}
            assert all(id(layer.V) in params and id(layer.alpha) not in params for layer in layers)
            # Adam moments were carried over for the kept rows only
            for layer in layers:
                assert opt.state[layer.V]["exp_avg"].shape == layer.V.shape
    assert temps[0] == pytest.approx(4.0) and temps[9] is not None and temps[10] is None
    assert all(a >= b for a, b in itertools.pairwise(temps[:10]))


def test_freeze_epoch_beyond_run_is_rejected():
    method = DynaDiagMethod(DiagSparsifyConfig(0.9), TemperatureSchedule(freeze_epoch=50, per_epoch=True))
    with pytest.raises(ValueError, match="freeze_epoch=50 is beyond the run"):
        method.bind(steps_per_epoch=10, total_steps=100)


def test_layers_are_diaglinear():
    model = _model()
    DynaDiagMethod(DiagSparsifyConfig(0.5), TemperatureSchedule(per_epoch=True)).apply_(model)
    assert isinstance(model.blocks[0].mlp.fc1, DiagLinear)
