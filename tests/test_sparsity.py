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
    assert stats["target"] == pytest.approx(0.9, abs=0.01)
    assert 0.0 < stats["effective"] < stats["target"]  # patch embedding and head stay dense

    diagonal = tiny_vit()
    DynaDiagMethod(DiagSparsifyConfig(0.9), TemperatureSchedule(per_epoch=True)).apply_(diagonal)
    soft = sparsity_stats(diagonal)
    assert soft["effective"] == pytest.approx(0.0, abs=1e-6)  # every diagonal is live before the freeze
    freeze_all_(diagonal)
    frozen = sparsity_stats(diagonal)
    assert frozen["target"] == pytest.approx(0.9, abs=0.02)
    expected = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(frozen["layers"]) == expected
    torch.testing.assert_close(torch.tensor(frozen["target"]), torch.tensor(soft["target"]))
