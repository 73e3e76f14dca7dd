"""How decided a diagonal selection is: top-K share, live diagonals, churn, boundary gap and the freeze drop.

DynaDiag's soft phase is only useful if, by the freeze, the ``K`` diagonals it keeps already carry the layer:
otherwise the freeze is a one-shot prune. These numbers say whether that happened, per layer and as a model mean:

- **top-K share**: ``sum of the K largest soft weights / sum of all soft weights`` (1 when exactly ``K`` are live);
- **live diagonals**: ``exp(entropy(w / sum w))``, the effective number of diagonals carrying weight (``K`` when the
  ``K`` kept ones carry equal weight and the rest none; ``P`` when the weight is spread evenly);
- **churn**: fraction of the current top-``K`` set that was not in it at the previous observation;
- **alpha gap**: ``alpha`` of the ``K``-th minus the ``(K+1)``-th ranked diagonal (how far the kept set is from a
  tie), also divided by the layer's temperature, the scale at which the paper's soft weights see ``alpha``;
- **freeze drop**: top-1 just before the freeze minus top-1 just after it (the trainer measures both).

A layer may refine what "soft weights" and "ranking" mean by defining ``selection_weights()`` (``[P]``, the weights
it computes with) and ``selection_scores()`` (``[P]``, higher is kept first; ``-inf`` for diagonals it can never
keep) and ``selection_temperature()`` (the scale at which its weights see ``alpha``); plain
:class:`~dynadiag.DiagLinear` layers use ``soft_weights()``, ``alpha`` and ``temperature``. Frozen layers have a
share of 1 and exactly ``K`` live diagonals; their churn still counts (DiagHeur swaps diagonals of frozen layers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear

__all__ = ["SelectionMonitor", "layer_selection", "selection_stats"]


@torch.no_grad()
def selection_stats(weights: torch.Tensor, scores: torch.Tensor, k: int) -> dict[str, Any]:
    """Selection numbers of one layer from its soft weights and ranking scores.

    Args:
        weights: non-negative per-diagonal weights the layer computes with, ``[P]``.
        scores: ranking (the freeze keeps the ``k`` largest), ``[P]``; ``-inf`` marks diagonals that cannot be kept.
        k: diagonals kept at the freeze.

    Returns:
        ``topk_share`` (float), ``live`` (float), ``alpha_gap`` (float, NaN when fewer than ``k + 1`` diagonals are
        rankable) and ``selected`` (``[k]`` int64, the ids of the ``k`` top-ranked diagonals, ascending).
    """
    w = weights.detach().double().clamp_min(0).flatten()  # [P]
    s = scores.detach().double().flatten()  # [P]
    total = w.sum()
    k = min(int(k), w.numel())
    if total > 0:
        share = (torch.topk(w, k).values.sum() / total).item()
        p = w / total
        entropy = -(p * p.clamp_min(1e-300).log()).sum()
        live = math.exp(entropy.item())
    else:
        share, live = 0.0, 0.0
    ranked = torch.sort(s, descending=True).values
    finite = int(torch.isfinite(ranked).sum())
    gap = (ranked[k - 1] - ranked[k]).item() if finite > k else float("nan")
    selected = torch.topk(s, k).indices.sort().values
    return {"topk_share": share, "live": live, "alpha_gap": gap, "selected": selected}


def layer_selection(layer: DiagLinear | DiagConv2d) -> dict[str, Any]:
    """:func:`selection_stats` of one diagonal layer (see the module docstring for the hooks a layer may define)."""
    if layer.is_frozen:
        k = int(layer.k)
        return {"topk_share": 1.0, "live": float(k), "alpha_gap": float("nan"), "selected": layer.offsets.sort().values}
    weights_fn = getattr(layer, "selection_weights", None)
    scores_fn = getattr(layer, "selection_scores", None)
    weights = weights_fn() if weights_fn is not None else layer.soft_weights()
    scores = scores_fn() if scores_fn is not None else layer.alpha
    return selection_stats(weights, scores, layer.k)


class SelectionMonitor:
    """Tracks the selection of every diagonal layer of a model across evaluations, and the freeze drop.

    :meth:`observe` returns the metrics to log (``selection/<metric>`` model means, ``selection/<metric>/<layer>``
    per layer); :meth:`record_freeze` stores the top-1 before and after the freeze together with the selection
    numbers just before it; :meth:`summary` gives what the run summary reports. The state (previous sets, freeze
    numbers) is checkpointed with :meth:`state_dict`, so churn and the freeze drop survive a resume.
    """

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}
        self.freeze: dict[str, float] = {}
        self.last: dict[str, float] = {}

    @staticmethod
    def layers(model: nn.Module) -> list[tuple[str, DiagLinear | DiagConv2d]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]

    @torch.no_grad()
    def observe(self, model: nn.Module, update_previous: bool = True) -> dict[str, float]:
        """Selection metrics of every diagonal layer now (empty for a model without diagonal layers)."""
        layers = self.layers(model)
        if not layers:
            return {}
        record: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {"topk_share": [], "live": [], "live_over_k": [], "alpha_gap": []}
        churns: list[float] = []
        soft_gaps: list[float] = []
        for name, layer in layers:
            stats = layer_selection(layer)
            selected = stats["selected"].cpu()
            values = {
                "topk_share": stats["topk_share"],
                "live": stats["live"],
                "live_over_k": stats["live"] / max(1, int(layer.k)),
                "alpha_gap": stats["alpha_gap"],
            }
            previous = self.previous.get(name)
            if previous is not None and previous.numel() == selected.numel():
                values["churn"] = 1.0 - torch.isin(selected, previous).double().mean().item()
                churns.append(values["churn"])
            if not layer.is_frozen and math.isfinite(stats["alpha_gap"]):
                scale_fn = getattr(layer, "selection_temperature", None)  # alpha's scale in the soft weights
                temperature = float(scale_fn() if scale_fn is not None else getattr(layer, "temperature", 1.0)) or 1.0
                values["alpha_gap_over_t"] = stats["alpha_gap"] / temperature
                soft_gaps.append(values["alpha_gap_over_t"])
            for key, value in values.items():
                record[f"selection/{key}/{name}"] = value
                if key in per_metric:
                    per_metric[key].append(value)
            if update_previous:
                self.previous[name] = selected
        for key, values in per_metric.items():
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                record[f"selection/{key}"] = sum(finite) / len(finite)
        if churns:
            record["selection/churn"] = sum(churns) / len(churns)
        if soft_gaps:
            record["selection/alpha_gap_over_t"] = sum(soft_gaps) / len(soft_gaps)
        record["selection/frozen_fraction"] = sum(layer.is_frozen for _, layer in layers) / len(layers)
        self.last = {k: v for k, v in record.items() if k.count("/") == 1}
        return record

    def record_freeze(self, top1_before: float, top1_after: float, before: dict[str, float], step: int) -> dict:
        """Store the freeze's accuracy change and the model-mean selection numbers measured just before it.

        Args:
            top1_before: validation top-1 (%) just before the freeze.
            top1_after: validation top-1 (%) just after it.
            before: :meth:`observe`'s record just before the freeze.
            step: optimizer steps done when the freeze happened.

        Returns:
            The ``selection/freeze_*`` metrics to log.
        """
        self.freeze = {
            "freeze_step": float(step),
            "freeze_top1_before": float(top1_before),
            "freeze_top1_after": float(top1_after),
            "freeze_drop": float(top1_before) - float(top1_after),
        }
        for key in ("topk_share", "live_over_k", "alpha_gap", "alpha_gap_over_t"):
            if f"selection/{key}" in before:
                self.freeze[f"{key}_at_freeze"] = before[f"selection/{key}"]
        return {f"selection/{k}": v for k, v in self.freeze.items()}

    def summary(self) -> dict[str, float]:
        """Freeze numbers (if a freeze happened) and the latest model-mean top-K share and live diagonals."""
        out = dict(self.freeze)
        for key in ("topk_share", "live_over_k"):
            if f"selection/{key}" in self.last:
                out[f"{key}_final"] = self.last[f"selection/{key}"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous), "freeze": dict(self.freeze), "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {k: torch.as_tensor(v) for k, v in (state.get("previous") or {}).items()}
        self.freeze = dict(state.get("freeze") or {})
        self.last = dict(state.get("last") or {})
