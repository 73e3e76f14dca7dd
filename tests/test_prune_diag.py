import timm
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag import functional as DF
from dynadiag.prune.calibration import InputStats
from dynadiag.prune.diag import diag_scores, linear_to_diag
from dynadiag.prune.pipeline import PruneConfig, prune_model_


def _tiny_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        depth=2,
        embed_dim=32,
        num_heads=2,
    ).eval()


def test_energy_scores_hand_made():
    # 3x3: diagonal p holds W[(t + p) % 3, t]; E[x^2] = [4, 1, 0] so column 2 carries no energy
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    stats = InputStats(count=1, sum=torch.zeros(3, dtype=torch.float64), sum_sq=torch.tensor([4.0, 1.0, 0.0]).double())
    # p=0: (0,0),(1,1),(2,2) -> 1*4 + 25*1 + 81*0; p=1: (1,0),(2,1),(0,2) -> 16*4 + 64
    # p=2: (2,0),(0,1),(1,2) -> 49*4 + 4
    expected = torch.tensor([29.0, 128.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(diag_scores(w, stats, "energy"), expected)
    torch.testing.assert_close(diag_scores(w, None, "magnitude"), torch.tensor([107.0, 89.0, 89.0]).double())
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(w)
    # K = 1 at sparsity 0.6: energy keeps diagonal 2, magnitude would keep the main diagonal
    assert linear_to_diag(layer, 0.6, stats).offsets.tolist() == [2]
    assert linear_to_diag(layer, 0.6, None, score="magnitude").offsets.tolist() == [0]


def test_sparsity_zero_is_lossless():
    model = _tiny_vit()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    report = prune_model_(model, PruneConfig(method="diag", sparsity=0.0, backend="reference"), [x])
    assert report.sparsity == 0.0 and len(report.layers) == 8
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_sparsity_090_keeps_exactly_k_diagonals():
    model = _tiny_vit()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(4, 1, 16, 16)
    prune_model_(model, PruneConfig(method="diag", sparsity=0.9, backend="reference"), [x])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DiagLinear)}
    assert len(layers) == 8 and isinstance(model.head, nn.Linear) and not isinstance(model.head, DiagLinear)
    for name, layer in layers.items():
        k = DF.num_active_diagonals(layer.in_features, layer.out_features, 0.9)
        assert layer.is_frozen and layer.k == k and layer.offsets.numel() == k
        assert layer.V.shape == (k, layer.diag_length)
        # the kept values are the dense layer's own diagonals
        torch.testing.assert_close(layer.V.detach(), DF.gather_diagonals(dense[name], layer.offsets))
        assert (layer.dense_weight() != 0).sum() <= k * layer.diag_length
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
