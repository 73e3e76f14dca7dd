import pytest
import torch
from _methods_common import tiny_vit

from dynadiag.methods.dynadiag import DynaDiagMethod, freeze_all_
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.static import StaticMethod
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.sparsity import sparsity_stats


def test_sparsity_stats_counts_masked_and_diagonal_targets_alike():
    masked = tiny_vit()
    method = StaticMethod(MaskSparsifyConfig(0.9))
    method.bind(steps_per_epoch=1, total_steps=1)
    method.apply_(masked)
    stats = sparsity_stats(masked)
    # per block (width 32, MLP 128) round(0.1 x numel) of qkv 3072, proj 1024, fc1 4096, fc2 4096 weights
    assert stats["target"] == pytest.approx(1 - (307 + 102 + 410 + 410) / 12288, rel=1e-12)
    assert 0.0 < stats["effective"] < stats["target"]  # patch embedding and head stay dense

    diagonal = tiny_vit()
    DynaDiagMethod(DiagSparsifyConfig(0.9), TemperatureSchedule(per_epoch=True)).apply_(diagonal)
    soft = sparsity_stats(diagonal)
    assert soft["effective"] == pytest.approx(0.0, abs=1e-6)  # every diagonal is live before the freeze
    freeze_all_(diagonal)
    frozen = sparsity_stats(diagonal)
    # K * D of P * D per layer: qkv 10 x 32 of 96 x 32, proj 4 x 32 of 32 x 32, fc1 and fc2 13 x 32 of 128 x 32
    assert frozen["target"] == pytest.approx(1 - (10 + 4 + 13 + 13) * 32 / 12288, rel=1e-12)
    expected = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(frozen["layers"]) == expected
    torch.testing.assert_close(torch.tensor(frozen["target"]), torch.tensor(soft["target"]))
