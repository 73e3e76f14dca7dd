import math

import pytest
import timm
import torch
from _methods_common import run_steps, tiny_vit
from torch import nn

from dynadiag.methods.density import num_kept
from dynadiag.methods.masks import MaskSparsifyConfig, reset_optimizer_state_, sparse_init_
from dynadiag.methods.static import StaticMethod
from dynadiag.sparsity import MASK_BUFFER, MaskReport, masked_layers
from dynadiag.targets import select_layers


def _assert_layer_targets(method):
    for name, module in method.layers:
        numel = module.weight.numel()
        assert int(module.weight_mask.sum()) == num_kept(numel, method.densities[name]), name


def test_select_layers_defaults_match_dynadiag_targets():
    model = tiny_vit()
    names = [n for n, _ in select_layers(model)]
    assert names == [
        f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    both = [n for n, _ in select_layers(model, first_layer="sparse", head="sparse")]
    assert both[0] == "patch_embed.proj" and both[-1] == "head" and len(both) == 10
    assert [n for n, _ in select_layers(model, exclude=["*.attn.*"])] == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    # an explicit pattern that matches the head is overridden by head="dense"
    assert [n for n, _ in select_layers(model, include=["head", "blocks.0.mlp.fc1"])] == ["blocks.0.mlp.fc1"]
    assert "patch_embed.proj" not in [n for n, _ in select_layers(model, include=["*"])]
    with pytest.raises(ValueError, match="matches no"):
        select_layers(model, include=["blocks.*.nothing"])
    with pytest.raises(ValueError, match="first_layer"):
        select_layers(model, first_layer="maybe")


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_static_masks_hit_the_target(distribution, sparsity):
    model = tiny_vit()
    method = StaticMethod(MaskSparsifyConfig(sparsity, distribution=distribution, first_layer="sparse", head="sparse"))
    report = method.apply_(model)
    assert isinstance(report, MaskReport) and len(report.layers) == 10
    _assert_layer_targets(method)
    assert report.sparsity == pytest.approx(sparsity, abs=2e-3)
    for (name, module), row in zip(method.layers, report.layers):
        assert row.name == name and row.nnz == int(module.weight_mask.sum())
        assert torch.all(module.weight[~module.weight_mask] == 0)
    text = str(report)
    assert "blocks.1.mlp.fc2" in text and "patch_embed.proj" in text and f"{report.sparsity:.4f}" in text
    if distribution == "uniform":
        assert all(abs(r.sparsity - sparsity) < 1e-3 for r in report.layers)


def test_masked_weights_stay_zero_through_adamw():
    model = tiny_vit()
    method = StaticMethod(MaskSparsifyConfig(0.9, distribution="erk"))
    method.apply_(model)
    method.bind(steps_per_epoch=5, total_steps=10)
    before = {n: m.weight_mask.clone() for n, m in method.layers}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5, betas=(0.9, 0.99))

    def check(step, metrics):
        for name, module in method.layers:
            mask = module.weight_mask
            assert torch.equal(mask, before[name])
            assert torch.all(module.weight[~mask] == 0)
            state = optimizer.state[module.weight]
            assert torch.all(state["exp_avg"][~mask] == 0) and torch.all(state["exp_avg_sq"][~mask] == 0)
            assert module.weight[mask].abs().sum() > 0
        if step == 0:
            assert metrics["sparsity/effective"] == pytest.approx(method.mask_sparsity())

    def optimizer_kept_zeros(step):  # before the method re-masks: the optimizer alone kept the zeros
        for name, module in method.layers:
            assert torch.all(module.weight[~module.weight_mask] == 0), (name, step)

    run_steps(model, method, optimizer, 10, after_step=check, after_optimizer=optimizer_kept_zeros)


def test_masks_round_trip_through_state_dict():
    model = tiny_vit()
    method = StaticMethod(MaskSparsifyConfig(0.8, distribution="erk"), seed=1)
    method.apply_(model)
    state = model.state_dict()
    assert all(f"{name}.{MASK_BUFFER}" in state for name, _ in method.layers)
    fresh = tiny_vit()
    other = StaticMethod(MaskSparsifyConfig(0.8, distribution="erk"), seed=2)
    other.apply_(fresh)
    assert not all(torch.equal(a.weight_mask, b.weight_mask) for (_, a), (_, b) in zip(method.layers, other.layers))
    fresh.load_state_dict(state)
    for (name, a), (_, b) in zip(method.layers, other.layers):
        assert b.weight_mask.dtype == torch.bool and torch.equal(a.weight_mask, b.weight_mask), name
        assert torch.equal(a.weight, b.weight)
    assert [n for n, _ in masked_layers(fresh)] == [n for n, _ in method.layers]


def test_same_seed_same_masks_and_apply_once():
    a, b = tiny_vit(), tiny_vit()
    ma, mb = StaticMethod(MaskSparsifyConfig(0.9), seed=3), StaticMethod(MaskSparsifyConfig(0.9), seed=3)
    ma.apply_(a)
    mb.apply_(b)
    assert all(torch.equal(x.weight_mask, y.weight_mask) for (_, x), (_, y) in zip(ma.layers, mb.layers))
    with pytest.raises(ValueError, match="only once"):
        StaticMethod(MaskSparsifyConfig(0.9)).apply_(a)


def test_reset_optimizer_state():
    param = nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(4, 4)
    optimizer.step()
    where = torch.zeros(4, 4, dtype=torch.bool)
    where[1, 2] = where[3, 0] = True
    reset_optimizer_state_(optimizer, param, where)
    buf = optimizer.state[param]["momentum_buffer"]
    assert buf[where].eq(0).all() and buf[~where].eq(1).all()
    reset_optimizer_state_(None, param, where)  # no optimizer: nothing to do


def test_conv_layers_are_masked_too():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(256, 4))
    method = StaticMethod(MaskSparsifyConfig(0.75, include=["1"]))
    report = method.apply_(model)
    assert [r.name for r in report.layers] == ["1"] and report.layers[0].kind == "conv3x3"
    assert int(model[1].weight_mask.sum()) == num_kept(math.prod(model[1].weight.shape), 0.25)


def test_mixer_and_resnet_targets_match_dynadiag():
    from timm.models.mlp_mixer import MlpMixer

    from dynadiag import DiagSparsifyConfig, sparsify_

    mixer = MlpMixer(num_classes=5, img_size=16, patch_size=4, num_blocks=2, embed_dim=32)
    masked = [n for n, _ in select_layers(mixer)]
    diagonal = [
        r.name
        for r in sparsify_(
            MlpMixer(num_classes=5, img_size=16, patch_size=4, num_blocks=2, embed_dim=32),
            DiagSparsifyConfig(sparsity=0.9),
        ).layers
    ]
    assert masked == diagonal and len(masked) == 8 and "blocks.0.mlp_tokens.fc1" in masked
    resnet = timm.create_model("resnet18", num_classes=5)
    names = [n for n, _ in select_layers(resnet)]
    assert "layer1.0.conv1" in names and "layer2.0.downsample.0" in names and "conv1" not in names
    assert "fc" not in names
    assert [n for n, _ in select_layers(resnet, include=["fc"], types=(nn.Linear,), head="sparse")] == ["fc"]


def test_sparse_init_scales_each_neuron_to_its_kept_fan_in():
    torch.manual_seed(0)
    weight = torch.randn(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :2] = True  # fan-in 2 of 8: x2
    mask[1, :8] = True  # dense row: unchanged
    # row 2 keeps nothing: it stays as it is (its weights are masked anyway)
    scaled = weight.clone()
    sparse_init_(scaled, mask)
    assert torch.allclose(scaled[0], weight[0] * 2) and torch.equal(
        scaled[1:], weight[1:] * torch.tensor([[1.0], [8**0.5]])
    )
    # in a layer, the kept weights' pre-activation variance matches the dense layer's (statistically)
    torch.manual_seed(1)
    dense, sparse = nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False)
    sparse.weight.data.copy_(dense.weight)
    model = nn.Sequential()
    model.add_module("fc", sparse)
    StaticMethod(MaskSparsifyConfig(0.9, include=["fc"], head="sparse", first_layer="sparse", init="sparse")).apply_(
        model
    )
    x = torch.randn(512, 256)
    ratio = (sparse(x).std() / dense(x).std()).item()
    assert 0.9 < ratio < 1.1
    with pytest.raises(ValueError, match="init"):
        MaskSparsifyConfig(0.9, init="xavier")
