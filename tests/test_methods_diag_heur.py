import timm
import torch
from _methods_common import run_steps, tiny_vit
from torch import nn

from dynadiag import DiagConv2d, DiagLinear
from dynadiag.functional import gather_diagonals
from dynadiag.methods.diag_heur import DiagHeurMethod
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.sparsify import DiagSparsifyConfig


def _check_k(method):
    for name, layer in method.layers:
        offsets = layer.offsets
        assert layer.is_frozen and offsets.numel() == layer.k and layer.V.shape == (layer.k, layer.diag_length), name
        assert offsets.unique().numel() == layer.k and torch.equal(offsets, offsets.sort().values), name


def test_diag_heur_keeps_exactly_k_diagonals_through_training():
    model = tiny_vit()
    method = DiagHeurMethod(DiagSparsifyConfig(0.9, backend="reference"), RegrowSchedule(delta_t=2, t_end=0.75))
    report = method.apply_(model)
    names = [r.name for r in report.layers]
    assert names == [f"blocks.{b}.{p}" for b in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert report.model_params_after < report.model_params_before
    assert "blocks.0.mlp.fc1" in str(report)
    method.bind(steps_per_epoch=4, total_steps=12)
    _check_k(method)
    start = {n: layer.offsets.clone() for n, layer in method.layers}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    updates = []

    def check(step, metrics):
        _check_k(method)
        assert not method._grads  # nothing captured is kept between steps
        if "diag_heur/num_regrown" in metrics:
            updates.append(step)

    run_steps(model, method, optimizer, 12, after_step=check)
    assert updates == [1, 3, 5, 7]
    assert any(not torch.equal(start[n], layer.offsets) for n, layer in method.layers)


def test_captured_dense_gradient_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(6, 10))
    method = DiagHeurMethod(
        DiagSparsifyConfig(0.7, include=["fc"], backend="reference"), RegrowSchedule(delta_t=1, t_end=1.0)
    )
    method.apply_(model)
    method.bind(steps_per_epoch=2, total_steps=2)
    layer = model.fc
    dense = layer.to_linear()  # the same function with a dense weight: its gradient is the reference
    x = torch.randn(3, 5, 6)
    target = torch.randn(3, 5, 10)
    method.on_step_start(0, model)
    (layer(x) - target).pow(2).sum().backward()
    (dense(x) - target).pow(2).sum().backward()
    torch.testing.assert_close(method._grads["fc"], dense.weight.grad, rtol=1e-5, atol=1e-5)
    # the sparse gradient autograd gives is the same matrix restricted to the kept diagonals
    torch.testing.assert_close(layer.V.grad, gather_diagonals(dense.weight.grad, layer.offsets), rtol=1e-5, atol=1e-5)
    method.on_after_backward(0, model, None)
    assert not method._armed
    # not an update step: nothing is captured
    method.on_step_start(1, model)
    layer(x).sum().backward()
    assert not method._grads


def test_diag_heur_drops_smallest_and_grows_largest_gradient_diagonals():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 4, bias=False))
    method = DiagHeurMethod(
        DiagSparsifyConfig(0.5, include=["fc"]),
        RegrowSchedule(delta_t=1, drop_fraction=0.5, t_end=1.0, decay="constant"),
    )
    method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=4)
    layer: DiagLinear = model.fc
    assert layer.k == 2
    with torch.no_grad():
        layer.offsets.copy_(torch.tensor([0, 1]))
        layer.V.copy_(torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.1, 0.1, 0.1, 0.1]]))  # diagonal 1 is the weakest
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    # dense gradient with the largest norm along diagonal 3 (W[(t + 3) % 4, t]) and a smaller one along 2
    wanted = torch.zeros(4, 4)
    for t in range(4):
        wanted[(t + 3) % 4, t] = 5.0
        wanted[(t + 2) % 4, t] = 1.0
    method.on_step_start(0, model)
    x = torch.eye(4)  # with x = I, dL/dW = g^T x = g^T for g = dL/dy
    (layer(x) * wanted.t()).sum().backward()
    torch.testing.assert_close(method._grads["fc"], wanted)
    method.on_after_backward(0, model, optimizer)
    optimizer.step()
    state = optimizer.state[layer.V]
    state["exp_avg"].copy_(torch.tensor([[7.0] * 4, [8.0] * 4]))
    metrics = method.on_after_optimizer_step(0, model, optimizer)
    assert layer.offsets.tolist() == [0, 3]
    assert metrics["diag_heur/num_regrown"] == 1 and metrics["diag_heur/num_new"] == 1
    torch.testing.assert_close(layer.V, torch.tensor([[3.0] * 4, [0.0] * 4]))  # kept row kept, grown row zero
    torch.testing.assert_close(state["exp_avg"], torch.tensor([[7.0] * 4, [0.0] * 4]))  # state follows the rows
    assert torch.equal(layer.dense_weight()[torch.arange(4), torch.arange(4)], torch.full((4,), 3.0))


def test_diag_heur_state_round_trip():
    model = tiny_vit()
    method = DiagHeurMethod(DiagSparsifyConfig(0.8), RegrowSchedule(delta_t=1, t_end=1.0), seed=1)
    method.apply_(model)
    method.bind(steps_per_epoch=2, total_steps=2)
    run_steps(model, method, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    fresh = tiny_vit()
    DiagHeurMethod(DiagSparsifyConfig(0.8), seed=2).apply_(fresh)
    fresh.load_state_dict(model.state_dict())
    for (name, a), b in zip(method.layers, (m for m in fresh.modules() if isinstance(m, DiagLinear))):
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.V, b.V), name


def test_captured_conv_gradient_matches_autograd_and_scores_all_taps():
    """DiagConv2d: the captured dense kernel gradient is the one a dense conv gets; scores sum over the taps."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(6, 10, 3, stride=2, padding=1))
    method = DiagHeurMethod(DiagSparsifyConfig(0.7, include=["conv"]), RegrowSchedule(delta_t=1, t_end=1.0))
    method.apply_(model)
    method.bind(steps_per_epoch=2, total_steps=2)
    layer = model.conv
    assert isinstance(layer, DiagConv2d) and layer.is_frozen and layer.V.shape == (layer.k, 6, 9)
    dense = layer.to_conv()
    x = torch.randn(2, 6, 7, 7)
    target = torch.randn(2, 10, 4, 4)
    method.on_step_start(0, model)
    (layer(x) - target).pow(2).sum().backward()
    (dense(x) - target).pow(2).sum().backward()
    torch.testing.assert_close(method._grads["conv"], dense.weight.grad, rtol=1e-5, atol=1e-5)
    taps = dense.weight.grad.flatten(2)
    expected = torch.stack([gather_diagonals(taps[..., i]) for i in range(9)], dim=-1).flatten(1).norm(dim=1)
    torch.testing.assert_close(method.diagonal_grad_norms("conv", layer), expected, rtol=1e-5, atol=1e-5)


def test_diag_heur_on_a_resnet_keeps_exactly_k_diagonals_per_conv():
    model = timm.create_model("resnet18", num_classes=5, in_chans=3)
    method = DiagHeurMethod(
        DiagSparsifyConfig(0.9, backend="reference"), RegrowSchedule(delta_t=1, t_end=1.0, drop_fraction=0.5)
    )
    report = method.apply_(model)
    convs = [(n, m) for n, m in method.layers if isinstance(m, DiagConv2d)]
    assert len(convs) == len(method.layers) == 19  # every block conv and shortcut; stem and fc stay dense
    assert dict(report.dense) == {"conv1": "stem / patch embedding", "fc": "classifier head"}
    method.bind(steps_per_epoch=2, total_steps=2)
    start = {n: m.offsets.clone() for n, m in convs}
    run_steps(model, method, torch.optim.AdamW(model.parameters(), lr=1e-2), 2)
    for name, layer in convs:
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        assert layer.V.shape == (layer.k, layer.diag_length, taps), name
        assert layer.offsets.unique().numel() == layer.k, name
        assert int(torch.count_nonzero(layer.weight.detach())) <= layer.nnz, name
    assert sum(not torch.equal(start[n], m.offsets) for n, m in convs) > len(convs) // 2  # diagonals were swapped


def test_grouped_diag_heur_swaps_whole_groups():
    model = tiny_vit()
    method = DiagHeurMethod(
        DiagSparsifyConfig(0.5, backend="reference", group=8, permute=True), RegrowSchedule(delta_t=2, t_end=0.75)
    )
    method.apply_(model)
    method.bind(steps_per_epoch=4, total_steps=12)
    start = {n: layer.offsets.clone() for n, layer in method.layers}

    def whole_groups(step, metrics):
        _check_k(method)
        for name, layer in method.layers:
            assert layer.perm is not None, name
            counts = torch.bincount(layer.offsets // 8)
            assert set(counts[counts > 0].tolist()) == {8}, name  # only whole groups of 8 consecutive offsets
            assert (counts > 0).sum() == layer.k_groups, name

    whole_groups(0, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    run_steps(model, method, optimizer, 12, after_step=whole_groups)
    assert any(not torch.equal(start[n], layer.offsets) for n, layer in method.layers)


def test_captured_dense_gradient_with_permutation():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 16))
    method = DiagHeurMethod(
        DiagSparsifyConfig(0.5, include=["fc"], backend="reference", group=2, permute=True),
        RegrowSchedule(delta_t=1, t_end=1.0),
    )
    method.apply_(model)
    method.bind(steps_per_epoch=2, total_steps=2)
    layer = model.fc
    dense = layer.to_linear()
    x, target = torch.randn(3, 8), torch.randn(3, 16)
    method.on_step_start(0, model)
    (layer(x) - target).pow(2).sum().backward()
    (dense(x) - target).pow(2).sum().backward()
    # the captured gradient is that of the diagonal matrix, which acts on x[:, perm]
    torch.testing.assert_close(method._grads["fc"], dense.weight.grad[:, layer.perm], rtol=1e-5, atol=1e-5)
    method.on_after_backward(0, model, None)
