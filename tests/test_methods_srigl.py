import pytest
import torch
from _methods_common import run_steps, tiny_vit

from dynadiag.methods.density import num_kept
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.methods.srigl import SRigLMethod, constant_fan_in_update


def _fan_ins(mask):
    return mask.view(mask.shape[0], -1).sum(dim=1)


def _assert_constant_fan_in(method):
    for name, module in method.layers:
        fan_in = _fan_ins(module.weight_mask)
        active = fan_in[fan_in > 0]
        assert active.unique().numel() == 1, (name, fan_in.tolist())
        budget = num_kept(module.weight.numel(), method.densities[name])
        assert budget - active.numel() < int(active.sum()) <= budget, name
        assert torch.all(module.weight[~module.weight_mask] == 0), name


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_constant_fan_in_through_training(distribution):
    model = tiny_vit()
    method = SRigLMethod(
        MaskSparsifyConfig(0.8, distribution=distribution, first_layer="sparse", head="sparse"),
        RegrowSchedule(delta_t=2, t_end=0.75),
    )
    method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=12)
    _assert_constant_fan_in(method)
    for name, module in method.layers:  # no neuron starts ablated
        assert (_fan_ins(module.weight_mask) > 0).all(), name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    updates = []

    def check(step, metrics):
        _assert_constant_fan_in(method)
        if "srigl/num_regrown" in metrics:
            updates.append(step)
            empty = sum(int((_fan_ins(m.weight_mask) == 0).sum()) for _, m in method.layers)
            assert metrics["srigl/ablated_neurons"] == empty  # the neurons with no weight left, counted exactly
        head = dict(method.layers)["head"]
        assert (_fan_ins(head.weight_mask) > 0).all()  # the classifier's neurons are never ablated

    run_steps(model, method, optimizer, 12, after_step=check)
    assert updates == [1, 3, 5, 7]


def test_hand_made_update_ablates_unsalient_neuron_and_follows_gradients():
    # 3 neurons, fan-in 6, budget 6 -> k0 = 2. Neuron 2 has tiny weights and zero gradient: not salient.
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[5.0, 0.1, 0, 0, 0, 0], [4.0, 3.0, 0, 0, 0, 0], [0.01, 0.02, 0, 0, 0, 0]])
    grad = torch.tensor([[0, 0, 9.0, 0, 1.0, 0], [0, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0, 0]])
    new, grown = constant_fan_in_update(mask, weight.abs(), grad.abs(), n_drop=2, n_target=6, gamma_sal=0.5)
    # neuron 2 is ablated; the budget of 6 is spread over 2 neurons -> fan-in 3
    assert new.sum(dim=1).tolist() == [3, 3, 0]
    # RigL's step keeps the 4 largest weights (neuron 2's are the smallest) and grows gradients 9.0 and 1.0;
    # neuron 0 keeps its 2 weights and fills its fan-in of 3 with the largest gradient
    assert new[0].tolist() == [True, True, True, False, False, False]
    # neuron 1 keeps both weights and grows its only non-zero-gradient entry first
    assert new[1, :2].all() and new[1, 5]
    assert grown.nonzero().tolist() == [[0, 2], [1, 5]]
    # without ablation every neuron keeps fan-in 2 and the count is exact
    new, _ = constant_fan_in_update(mask, weight.abs(), grad.abs(), n_drop=2, n_target=6, gamma_sal=None)
    assert new.sum(dim=1).tolist() == [2, 2, 2] and new[0, :2].all() and new[1, :2].all()


def test_training_update_ablates_a_neuron_that_is_not_salient():
    """Through the method's hooks (not just constant_fan_in_update): a neuron whose weights are the smallest and
    whose gradient is zero loses all its weights, and its budget goes to the other neurons."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    config = MaskSparsifyConfig(0.5, include=["0"], first_layer="sparse")
    schedule = RegrowSchedule(delta_t=1, drop_fraction=0.5, t_end=1.0, decay="constant")
    method = SRigLMethod(config, schedule, gamma_sal=0.3)
    method.apply_(model)
    method.bind(steps_per_epoch=2, total_steps=2)  # one update, after step 0
    layer = model[0]
    assert _fan_ins(layer.weight_mask).tolist() == [3, 3, 3]  # budget 9 of 18 weights
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[5.0] * 6, [4.0] * 6, [1e-3] * 6]) * layer.weight_mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    layer.weight.grad = torch.tensor([[1.0] * 6, [2.0] * 6, [0.0] * 6])  # neuron 2: no gradient signal
    method.on_after_backward(0, model, optimizer)
    metrics = method.on_after_optimizer_step(0, model, optimizer)
    assert metrics["srigl/ablated_neurons"] == 1.0
    assert _fan_ins(layer.weight_mask).tolist() == [4, 4, 0]  # 9 // 2 per surviving neuron
    assert torch.all(layer.weight[2] == 0)


def test_no_ablation_keeps_nnz_constant():
    model = tiny_vit()
    method = SRigLMethod(MaskSparsifyConfig(0.9), RegrowSchedule(delta_t=1, t_end=1.0), gamma_sal=None)
    method.apply_(model)
    method.bind(steps_per_epoch=3, total_steps=3)
    before = {n: int(m.weight_mask.sum()) for n, m in method.layers}
    changed = []

    def check(step, metrics):
        assert {n: int(m.weight_mask.sum()) for n, m in method.layers} == before
        if "srigl/num_new" in metrics:  # updates after 1 and 2 steps; t_end = 3 steps
            assert metrics["srigl/ablated_neurons"] == 0
            changed.append(metrics["srigl/num_new"])

    run_steps(model, method, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3, after_step=check)
    assert len(changed) == 2 and sum(changed) > 0
    with pytest.raises(ValueError, match="gamma_sal"):
        SRigLMethod(MaskSparsifyConfig(0.9), gamma_sal=2.0)


def test_conv_fan_in_counts_every_kernel_tap():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.Linear(64, 4)
    )
    method = SRigLMethod(MaskSparsifyConfig(0.75, include=["2"]), RegrowSchedule(delta_t=1, t_end=1.0), gamma_sal=None)
    method.apply_(model)
    method.bind(steps_per_epoch=3, total_steps=3)
    conv = model[2]
    assert _fan_ins(conv.weight_mask).unique().tolist() == [72 // 4]  # fan-in 8 * 3 * 3 = 72, a quarter kept
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 6, 6)).pow(2).mean().backward()
        method.on_after_backward(step, model, optimizer)
        optimizer.step()
        assert method.on_after_optimizer_step(step, model, optimizer)["srigl/num_regrown"] > 0
        assert _fan_ins(conv.weight_mask).unique().tolist() == [18]
        assert torch.all(conv.weight[~conv.weight_mask] == 0)
