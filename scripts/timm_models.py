"""Drop-in check of DynaDiag on timm architectures across families (the supported-models table of docs/models.md).

Each model is created at a tiny size (no pretrained weights), sparsified with the default targets at 90 %, trained
two AdamW steps, frozen and trained one more step; then the check asserts that

- forward and backward ran, and every diagonal layer received a gradient;
- every converted layer computes with exactly ``K * D`` (per tap) non-zero weights, measured on its dense matrix,
  so its sparsity is exactly ``1 - K/P``, and the report's overall sparsity is the one those counts give;
- ``densify_`` gives back plain ``nn.Linear``/``nn.Conv2d`` layers and the same function (eval mode).

``tests/test_timm_models.py`` runs the same check per model (slow ones marked). ``python scripts/timm_models.py``
runs all of them and prints the Markdown table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dynadiag import DiagConv2d, DiagLinear, DiagSparsifyConfig, densify_, sparsify_
from dynadiag.methods.dynadiag import freeze_all_


@dataclass(frozen=True)
class ModelCase:
    arch: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    img: int = 32
    slow: bool = False

    @property
    def id(self) -> str:
        return self.arch


def _mixer(**kwargs: Any) -> nn.Module:  # registered Mixers fix patch_size and depth
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=32, patch_size=4, num_blocks=2, embed_dim=64, **kwargs)


def _convmixer(**kwargs: Any) -> nn.Module:
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=64, depth=2, kernel_size=3, patch_size=4, **kwargs)


_SWIN = {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": (1, 2), "num_heads": (1, 2)}
BUILDERS = {"mixer (MlpMixer, patch 4)": _mixer, "convmixer (ConvMixer, dim 64)": _convmixer}

MODELS: list[ModelCase] = [
    ModelCase("vit_tiny_patch16_224", "ViT", {"img_size": 32, "patch_size": 4, "depth": 2}),
    ModelCase("deit_tiny_distilled_patch16_224", "DeiT (distilled)", {"img_size": 32, "patch_size": 4, "depth": 2}),
    ModelCase("eva02_tiny_patch14_224", "EVA-02", {"img_size": 28, "patch_size": 4, "depth": 2}, img=28),
    ModelCase(
        "beit_base_patch16_224", "BEiT", {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
    ),
    ModelCase("cait_xxs24_224", "CaiT", {"img_size": 32, "patch_size": 4, "depth": 2}),
    ModelCase("xcit_nano_12_p16_224", "XCiT", {"img_size": 32, "patch_size": 8, "depth": 2}),
    ModelCase("swin_tiny_patch4_window7_224", "Swin", _SWIN),
    ModelCase("swinv2_tiny_window8_256", "Swin-V2", _SWIN),
    ModelCase("test_maxvit", "MaxViT", {"img_size": 32}),
    ModelCase("test_coatnet", "CoAtNet", {"img_size": 32}),
    ModelCase("pit_ti_224", "PiT", {"img_size": 32, "patch_size": 4, "stride": 2}),
    ModelCase("pvt_v2_b0", "PVT-v2", {"depths": (1, 1, 1, 1)}),
    ModelCase("twins_svt_small", "Twins", {"depths": (1, 1, 1, 1)}),
    ModelCase("levit_128s", "LeViT", {"img_size": 32}),
    ModelCase("mixer (MlpMixer, patch 4)", "MLP-Mixer"),
    ModelCase("resmlp_12_224", "ResMLP", {"img_size": 32}),
    ModelCase("gmlp_ti16_224", "gMLP", {"img_size": 32}),
    ModelCase("test_convnext", "ConvNeXt"),
    ModelCase("poolformer_s12", "PoolFormer (MetaFormer)"),
    ModelCase("efficientformer_l1", "EfficientFormer", {"depths": (1, 1, 1, 1)}, img=224, slow=True),
    ModelCase("test_mambaout", "MambaOut"),
    ModelCase("edgenext_xx_small", "EdgeNeXt"),
    ModelCase("mobilevit_xxs", "MobileViT"),
    ModelCase("convmixer (ConvMixer, dim 64)", "ConvMixer"),
    ModelCase("resnet18", "ResNet"),
    ModelCase("resnet50", "ResNet (bottleneck)", slow=True),
    ModelCase("regnety_002", "RegNet"),
    ModelCase("test_byobnet", "ByobNet"),
    ModelCase("test_nfnet", "NFNet"),
    ModelCase("test_efficientnet", "EfficientNet"),
    ModelCase("mobilenetv3_small_050", "MobileNetV3"),
    ModelCase("tiny_vit_5m_224", "TinyViT", img=64, slow=True),
    ModelCase("davit_tiny", "DaViT", {"depths": (1, 1, 1, 1)}, slow=True),
    ModelCase("hiera_tiny_224", "Hiera", {"img_size": 64}, img=64, slow=True),
]


def build(case: ModelCase) -> nn.Module:
    if case.arch in BUILDERS:
        return BUILDERS[case.arch](num_classes=10, **case.kwargs)
    return timm.create_model(case.arch, pretrained=False, num_classes=10, **case.kwargs)


def _diag_layers(model: nn.Module) -> list[tuple[str, DiagLinear | DiagConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]


def check(case: ModelCase, sparsity: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Run the drop-in check on one architecture (raises ``AssertionError`` on any mismatch); returns its numbers."""
    torch.manual_seed(seed)
    start = time.process_time()
    model = build(case)
    params = sum(p.numel() for p in model.parameters())
    report = sparsify_(model, DiagSparsifyConfig(sparsity=sparsity, backend="reference"))
    layers = _diag_layers(model)
    assert layers and len(layers) == len(report.layers)
    x = torch.randn(4, 3, case.img, case.img)
    y = torch.randint(0, 10, (4,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(3):  # two soft-phase steps, then one on the frozen model
        if step == 2:
            freeze_all_(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss), f"loss {loss} at step {step}"
        loss.backward()
        missing = [n for n, m in _diag_layers(model) if m.V.grad is None]
        assert not missing, f"no gradient reached {missing[:3]}"
        optimizer.step()
    nnz = dense = 0
    for name, layer in _diag_layers(model):
        assert layer.is_frozen
        measured = int(torch.count_nonzero(layer.weight.detach()))
        taps = layer.V.shape[-1] if layer.V.dim() == 3 else 1
        assert measured == layer.k * layer.diag_length * taps, f"{name}: {measured} non-zeros, K*D*taps={layer.nnz}"
        assert layer.achieved_sparsity == 1 - layer.k / layer.num_diagonals
        nnz += measured
        dense += layer.weight.numel()
    assert report.nnz == nnz and report.dense_weights == dense and report.sparsity == 1 - nnz / dense
    model.eval()
    with torch.no_grad():
        before = model(x)
        replaced = densify_(model)
        after = model(x)
    assert replaced == len(layers) and not _diag_layers(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    return {
        "params": params,
        "converted": len(layers),
        "dense": len(report.dense),
        "sparsity": report.sparsity,
        "reasons": sorted({reason for _, reason in report.dense}),
        "cpu_s": time.process_time() - start,
    }


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| family | architecture | params | converted | left dense | sparsity of converted | result |")
    print("|---|---|---|---|---|---|---|")
    for case in MODELS:
        if names and case.arch not in names:
            continue
        try:
            r = check(case)
            print(
                f"| {case.family} | `{case.arch}` | {r['params'] / 1e6:.2f}M | {r['converted']} | {r['dense']} | "
                f"{r['sparsity']:.4f} | pass ({r['cpu_s']:.1f} s) |",
                flush=True,
            )
        except Exception as exc:  # report every architecture, failures included
            print(f"| {case.family} | `{case.arch}` | | | | | FAIL: {type(exc).__name__}: {str(exc)[:120]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
