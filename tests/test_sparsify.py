import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from dynadiag import DiagConv2d, DiagLinear, DiagSparsifyConfig, densify_, sparsify_, sparsity_report
from dynadiag.methods.dynadiag import freeze_all_


def _vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10)


def _forward_backward(model, x):
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


def test_vit_tiny_default_targets():
    model = _vit()
    report = sparsify_(model, DiagSparsifyConfig(sparsity=0.9))
    names = [r.name for r in report.layers]
    assert len(names) == 12 * 4
    assert "blocks.0.attn.qkv" in names and "blocks.11.mlp.fc2" in names
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, DiagLinear)
    assert isinstance(model.patch_embed.proj, nn.Conv2d) and not isinstance(model.patch_embed.proj, DiagConv2d)
    assert 0.89 < report.sparsity < 0.91
    text = str(report)
    assert "blocks.0.attn.qkv" in text and "sparsity" in text
    _forward_backward(model, torch.randn(2, 1, 32, 32))
    assert model.blocks[0].attn.qkv.alpha.grad is not None
    freeze_all_(model)
    frozen = sparsity_report(model)
    assert frozen.model_params_after < report.model_params_before / 5
    _forward_backward(model, torch.randn(2, 1, 32, 32))


def test_mixer_targets():
    model = MlpMixer(num_classes=10, img_size=32, in_chans=1, patch_size=4, num_blocks=2, embed_dim=64)
    report = sparsify_(model, DiagSparsifyConfig(sparsity=0.8))
    assert len(report.layers) == 2 * 4
    assert {r.name.split(".", 2)[2] for r in report.layers} == {
        "mlp_tokens.fc1",
        "mlp_tokens.fc2",
        "mlp_channels.fc1",
        "mlp_channels.fc2",
    }
    _forward_backward(model, torch.randn(2, 1, 32, 32))


def test_resnet_targets():
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    report = sparsify_(model, DiagSparsifyConfig(sparsity=0.8))
    # 8 basic blocks x 2 convs + 3 downsample 1x1 convs; stem conv1 and fc stay dense
    assert len(report.layers) == 19
    assert not isinstance(model.conv1, DiagConv2d) and not isinstance(model.fc, DiagLinear)
    assert {r.kind for r in report.layers} == {"conv3x3", "conv1x1"}
    _forward_backward(model, torch.randn(2, 1, 32, 32))


def test_resnet50_layer_count():
    model = timm.create_model("resnet50", in_chans=1, num_classes=10)
    report = sparsify_(model, DiagSparsifyConfig(sparsity=0.9))
    assert len(report.layers) == 16 * 3 + 4


def test_densify_inverts_exactly():
    model = _vit().eval()
    sparsify_(model, DiagSparsifyConfig(sparsity=0.5, init="copy"))
    freeze_all_(model)
    x = torch.randn(2, 1, 32, 32)
    expected = model(x)
    assert densify_(model) == 48
    assert not any(isinstance(m, DiagLinear) for m in model.modules())
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_init_copy_keeps_dense_function_at_sparsity_zero():
    model = _vit().eval()
    x = torch.randn(2, 1, 32, 32)
    expected = model(x)
    sparsify_(model, DiagSparsifyConfig(sparsity=0.0, init="copy"))
    freeze_all_(model)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_include_exclude_and_filter():
    model = _vit()
    report = sparsify_(model, DiagSparsifyConfig(0.9, include=["blocks.*.mlp.fc1"], exclude=["blocks.0.*"]))
    assert len(report.layers) == 11
    model = _vit()
    report = sparsify_(model, DiagSparsifyConfig(0.9), filter_fn=lambda m, name: m.in_features == 192)
    assert all(r.in_features == 192 for r in report.layers) and len(report.layers) == 36


def test_bad_inputs():
    with pytest.raises(ValueError, match="sparsity must be in"):
        DiagSparsifyConfig(sparsity=1.2)
    with pytest.raises(
        ValueError, match=r"pattern .blocks\.\*\.nope. matches no nn.Linear/nn.Conv2d layer of VisionTransformer$"
    ):
        sparsify_(_vit(), DiagSparsifyConfig(0.5, include=["blocks.*.nope"]))
    with pytest.raises(ValueError, match=r"pattern .blocks\.0\.norm1. matches .* \(only a LayerNorm"):
        sparsify_(_vit(), DiagSparsifyConfig(0.5, include=["blocks.0.norm1"]))
    # nothing to convert: one error that says why each layer stays dense and which names include= can take
    with pytest.raises(ValueError, match=r"no layer of Sequential can be made sparse .*classifier head: 1 .*over: 0$"):
        sparsify_(nn.Sequential(nn.Linear(3, 3)), DiagSparsifyConfig(0.5))
    grouped = nn.Sequential()
    grouped.add_module("layer1", nn.Sequential(nn.Module()))
    grouped.layer1[0].conv1 = nn.Conv2d(8, 8, 3)
    grouped.layer1[0].conv2 = nn.Conv2d(8, 8, 3, groups=2)
    report = sparsify_(grouped, DiagSparsifyConfig(0.5))  # a model of blocks alone: its first layer is a target
    assert [r.name for r in report.layers] == ["layer1.0.conv1"]
    assert report.dense == [("layer1.0.conv2", "grouped/depthwise convolution (groups > 1)")]
    grouped.layer1[0].conv1 = nn.Conv2d(8, 8, 3, groups=4)
    with pytest.raises(ValueError, match=r"grouped/depthwise convolution \(groups > 1\): 2 \(e.g. layer1.0.conv1, "):
        sparsify_(grouped, DiagSparsifyConfig(0.5))
    with pytest.raises(ValueError, match=r"cannot convert 'layer1\.0\.conv2': grouped convolution"):
        sparsify_(grouped, DiagSparsifyConfig(0.5, include=["layer1.0.conv2"]))
    model = _vit()
    sparsify_(model, DiagSparsifyConfig(0.5))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv"):
        model.blocks[0].attn.qkv(torch.randn(2, 3, 100))


def test_init_kaiming_builds_each_layer_directly():
    """init=kaiming: fresh layers (one kaiming draw each, alpha = 1/P, zero bias); the dense weights are not read."""
    model = _vit()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.fill_(float("nan"))
                module.bias.fill_(float("nan"))
    torch.manual_seed(123)
    sparsify_(model, DiagSparsifyConfig(sparsity=0.9))
    layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
    torch.manual_seed(123)
    first = DiagLinear(layers[0].in_features, layers[0].out_features, sparsity=0.9)
    assert torch.equal(layers[0].V, first.V)  # the very first draw after the seed: no copy-then-reset
    for layer in layers:
        assert torch.isfinite(layer.V).all() and layer.V.abs().max() <= layer.diag_length**-0.5
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert torch.equal(layer.alpha, torch.full_like(layer.alpha, 1.0 / layer.num_diagonals))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_init_grad_flow_scales_v_to_the_kept_fan_in(sparsity):
    """init=grad_flow: V ~ N(0, (2 / fan_in)^2), fan_in = k * D / out: the masked baselines' rule, per layer shape."""
    model = _vit()
    torch.manual_seed(0)
    sparsify_(model, DiagSparsifyConfig(sparsity=sparsity, init="grad_flow"))
    layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
    assert {(m.in_features, m.out_features) for m in layers} == {(192, 576), (192, 192), (192, 768), (768, 192)}
    for layer in layers:
        fan_in = layer.k * layer.diag_length / layer.out_features
        assert abs(layer.V.std().item() / (2.0 / fan_in) - 1.0) < 0.05  # >= 36k draws per layer
        assert abs(layer.V.mean().item()) < 0.05 * 2.0 / fan_in
        assert torch.equal(layer.alpha, torch.full_like(layer.alpha, 1.0 / layer.num_diagonals))
    with pytest.raises(ValueError, match=r"init must be one of kaiming, grad_flow, copy, got 'xavier'"):
        DiagSparsifyConfig(0.5, init="xavier")
