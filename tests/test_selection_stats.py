"""Selection instrumentation: top-K share, live diagonals, churn, boundary gap and the freeze drop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dynadiag.layers import DiagLinear
from dynadiag.selection_stats import SelectionMonitor, layer_selection, selection_stats


def test_exactly_k_equal_weights_is_decided():
    weights = torch.zeros(10)
    weights[[1, 4, 7]] = 1.0
    scores = torch.arange(10.0)
    scores[[1, 4, 7]] += 100.0
    stats = selection_stats(weights, scores, 3)
    assert stats["topk_share"] == pytest.approx(1.0)
    assert stats["live"] == pytest.approx(3.0)
    assert stats["selected"].tolist() == [1, 4, 7]
    assert stats["alpha_gap"] == pytest.approx((100.0 + 1.0) - 9.0)  # the K-th (id 1) minus the best unkept (id 9)


def test_uniform_weights_are_undecided():
    stats = selection_stats(torch.full((20,), 0.25), torch.zeros(20), 5)
    assert stats["topk_share"] == pytest.approx(5 / 20)
    assert stats["live"] == pytest.approx(20.0)
    assert stats["alpha_gap"] == 0.0


def test_minus_inf_scores_are_not_rankable():
    scores = torch.tensor([3.0, 2.0, -math.inf, -math.inf])
    stats = selection_stats(torch.tensor([1.0, 1.0, 0.0, 0.0]), scores, 2)
    assert math.isnan(stats["alpha_gap"])  # no (K+1)-th candidate
    assert stats["selected"].tolist() == [0, 1]


def test_layer_selection_matches_the_paper_soft_weights_and_freeze():
    layer = DiagLinear(12, 8, sparsity=0.75, backend="reference")  # P = 12, K = 3
    with torch.no_grad():
        layer.alpha.copy_(torch.linspace(0, 1, 12))
    layer.temperature = 0.05
    stats = layer_selection(layer)
    weights = layer.soft_weights()
    assert stats["topk_share"] == pytest.approx((weights.topk(3).values.sum() / weights.sum()).item())
    assert stats["selected"].tolist() == [9, 10, 11]
    layer.freeze_()
    frozen = layer_selection(layer)
    assert frozen["selected"].tolist() == layer.offsets.tolist() == [9, 10, 11]
    assert frozen["topk_share"] == 1.0 and frozen["live"] == 3.0


def test_monitor_means_churn_and_state_roundtrip():
    model = nn.Sequential(DiagLinear(8, 8, sparsity=0.75), DiagLinear(8, 16, sparsity=0.75))  # K = 2 and 4
    model[0].temperature = model[1].temperature = 0.5
    with torch.no_grad():
        model[0].alpha.copy_(torch.arange(8.0))
        model[1].alpha.copy_(torch.arange(16.0))
    monitor = SelectionMonitor()
    first = monitor.observe(model)
    assert "selection/churn" not in first  # nothing to compare with yet
    assert first["selection/topk_share"] == pytest.approx(
        (first["selection/topk_share/0"] + first["selection/topk_share/1"]) / 2
    )
    assert first["selection/alpha_gap/0"] == pytest.approx(1.0)
    assert first["selection/alpha_gap_over_t/0"] == pytest.approx(2.0)
    with torch.no_grad():
        model[0].alpha.copy_(-torch.arange(8.0))  # layer 0's kept pair becomes {0, 1}: full churn
    restored = SelectionMonitor()
    restored.load_state_dict(monitor.state_dict())
    second = restored.observe(model)
    assert second["selection/churn/0"] == 1.0 and second["selection/churn/1"] == 0.0
    assert second["selection/churn"] == 0.5


def test_trainer_reports_freeze_drop_and_selection(tmp_path):
    from tests.test_trainer import make_trainer

    trainer = make_trainer(tmp_path, epochs=3)  # DynaDiag freezes after epoch 1 (step 4)
    summary = trainer.fit()
    trainer.logger.finish()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/top1" in r]
    assert 0.0 < summary["topk_share_at_freeze"] < 1.0  # the paper recipe's soft phase, just before the freeze
    assert evals[-1]["selection/topk_share"] == 1.0 and evals[-1]["selection/frozen_fraction"] == 1.0
    assert "selection/churn" in evals[-1] and "selection/topk_share/blocks.0.attn.qkv" in evals[-1]
    freeze = [r for r in records if "selection/freeze_drop" in r]
    assert len(freeze) == 1 and freeze[0]["step"] == 4
    drop = freeze[0]["selection/freeze_top1_before"] - freeze[0]["selection/freeze_top1_after"]
    assert freeze[0]["selection/freeze_drop"] == pytest.approx(drop)
    # the evaluation right after the freeze step sees the same frozen model as the probe did
    assert evals[0]["val/top1"] == pytest.approx(freeze[0]["selection/freeze_top1_after"])
    for key in ("freeze_drop", "freeze_top1_before", "freeze_top1_after", "topk_share_at_freeze", "topk_share_final"):
        assert key in summary
    assert json.loads((tmp_path / "summary.json").read_text())["freeze_drop"] == summary["freeze_drop"]
