import pytest
import torch
from _methods_common import run_steps, tiny_vit

from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.sparsimony_rigl import SparsimonyRigLMethod

pytest.importorskip("sparsimony")


def _forward_densities(method):
    return {name: torch.count_nonzero(m.weight).item() / m.weight.numel() for name, m in method.layers}


def test_sparsimony_rigl_masks_are_real_and_change():
    torch.manual_seed(0)
    model = tiny_vit()
    method = SparsimonyRigLMethod(MaskSparsifyConfig(0.9), delta_t=2, t_end=0.75)
    report = method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=12)  # the trainer's order: apply_ at model build, then bind
    assert "sparsimony" in report and len(method.layers) == 8  # the blocks' qkv, proj, fc1, fc2, as RigL masks
    before = {name: m.parametrizations.weight[0].mask.clone() for name, m in method.layers}
    # the weights the forward pass uses are sparse: 10 % non-zeros per layer (sparsimony's int() rounding)
    for name, density in _forward_densities(method).items():
        assert density == pytest.approx(0.1, abs=2e-3), name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    run_steps(model, method, optimizer, 12)
    assert method._updates == 4  # sparsimony counts steps from 1: updates at 2, 4, 6, 8 (t_end = 9)
    assert any(not torch.equal(before[n], m.parametrizations.weight[0].mask) for n, m in method.layers)
    for name, density in _forward_densities(method).items():
        assert density <= 0.1 + 2e-3, name
    assert 1.0 - method.effective_density() == pytest.approx(0.9, abs=3e-3)


def test_num_updates_sets_the_interval():
    method = SparsimonyRigLMethod(MaskSparsifyConfig(0.9), num_updates=15, t_end=0.75)
    method.bind(steps_per_epoch=22, total_steps=880)
    assert method.interval() == 42  # ceil(660 / 16): 15 updates before step 660
