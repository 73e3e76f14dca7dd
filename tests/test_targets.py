"""Default targets by structure (dynadiag.targets): blocks found wherever they nest, the rest dense with a reason."""

import pytest
import timm
import torch
from torch import nn

from dynadiag import DiagLinear, DiagSparsifyConfig, sparsify_
from dynadiag.targets import block_names, default_reasons, plan_targets, select_layers


def _strip(name: str) -> str:
    """``layers.1.blocks.0.attn.qkv`` -> ``layers.blocks.attn.qkv``."""
    return ".".join(p for p in name.split(".") if not p.isdigit())


def test_vit_defaults_are_the_four_block_linears_and_nothing_else():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10, depth=2)
    names = [n for n, _ in select_layers(model)]
    assert names == [f"blocks.{b}.{x}" for b in range(2) for x in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    reasons = default_reasons(model)
    assert reasons["patch_embed.proj"] == "stem / patch embedding" and reasons["head"] == "classifier head"


def test_swin_blocks_nested_in_stages_and_patch_merging_stays_dense():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=24, depths=(1, 2), num_heads=(1, 2)
    )
    plan = plan_targets(model)
    assert {_strip(n) for n, _ in plan.targets} == {
        f"layers.blocks.{x}" for x in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert len(plan.targets) == 3 * 4
    dense = dict(plan.dense)
    assert dense["layers.1.downsample.reduction"].startswith("stage-level layer")
    assert dense["patch_embed.proj"] == "stem / patch embedding" and dense["head.fc"] == "classifier head"
    # every linear/conv layer is either a target or listed with its reason
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert layers == {n for n, _ in plan.targets} | set(dense)


def test_convnext_pointwise_mlps_targeted_depthwise_and_downsampling_dense():
    model = timm.create_model("test_convnext", num_classes=10)
    plan = plan_targets(model)
    assert {_strip(n) for n, _ in plan.targets} == {"stages.blocks.mlp.fc1", "stages.blocks.mlp.fc2"}
    dense = dict(plan.dense)
    assert dense["stages.0.blocks.0.conv_dw"] == "grouped/depthwise convolution (groups > 1)"
    assert dense["stages.1.downsample.1"].startswith("stage-level layer")
    assert dense["stem.0"] == "stem / patch embedding"


def test_efficientnet_pointwise_convs_in_blocks_of_blocks():
    model = timm.create_model("test_efficientnet", num_classes=10)
    blocks = block_names(model)
    assert "blocks.1" in blocks and "blocks.1.0" in blocks  # stages of blocks, both found
    plan = plan_targets(model)
    kinds = {_strip(n).rsplit(".", 1)[-1] for n, _ in plan.targets}
    assert {"conv_pw", "conv_pwl"} <= kinds and "conv_dw" not in kinds
    dense = dict(plan.dense)
    assert dense["conv_stem"] == "stem / patch embedding" and dense["classifier"] == "classifier head"
    assert dense["conv_head"] == "outside the repeated blocks"


def test_distilled_model_keeps_both_heads_dense_and_report_lists_reasons():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=10)
    report = sparsify_(model, DiagSparsifyConfig(0.9))
    assert [r.name for r in report.layers] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert dict(report.dense) == {
        "patch_embed.proj": "stem / patch embedding",
        "head": "classifier head",
        "head_dist": "classifier head",
    }
    text = str(report)
    assert "left dense: 3 layers" in text and "classifier head: 2 (head, head_dist)" in text


def test_custom_forward_and_tiny_layers_stay_dense():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.tiny = nn.Linear(16, 4)
            self.same = timm.layers.Conv2dSame(16, 16, 1)  # pads in its own forward

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 16), nn.Sequential(Block(), Block()), nn.Linear(16, 2))
    reasons = default_reasons(model)
    assert reasons["1.0.fc"] is None and reasons["1.1.fc"] is None
    assert reasons["1.0.tiny"].startswith("too small")
    assert reasons["1.0.same"] == "Conv2dSame has its own forward"
    assert reasons["0"] == "stem / patch embedding" and reasons["2"] == "classifier head"


def test_masked_methods_and_pruning_share_the_structural_defaults():
    model = timm.create_model("test_convnext", num_classes=10)
    default = [n for n, _ in select_layers(model)]
    assert [n for n, _ in select_layers(model, first_layer="sparse", head="sparse")] == ["stem.0", *default, "head.fc"]
    assert [n for n, _ in select_layers(model, types=(nn.Linear,))] == default  # its MLPs are nn.Linear
    with pytest.raises(ValueError, match="first_layer"):
        select_layers(model, first_layer="maybe")


def test_weight_reading_attention_runs_after_sparsify():
    """EVA reads ``self.qkv.weight`` in its attention (``F.linear(x, self.qkv.weight, qkv_bias)``)."""
    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=4, depth=1, num_classes=10)
    sparsify_(model, DiagSparsifyConfig(0.9))
    assert isinstance(model.blocks[0].attn.qkv, DiagLinear)
    model(torch.randn(2, 3, 28, 28)).sum().backward()
    assert model.blocks[0].attn.qkv.V.grad is not None and model.blocks[0].attn.qkv.alpha.grad is not None
