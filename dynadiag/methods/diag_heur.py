"""DiagHeur: RigL's drop/grow heuristic on whole diagonals of frozen :class:`~dynadiag.DiagLinear` (and
:class:`~dynadiag.DiagConv2d`) layers.

The baseline of the DynaDiag paper: every layer holds exactly ``K`` wrapped diagonals (a random set at the start)
and, on RigL's schedule (:class:`~dynadiag.methods.regrow.RegrowSchedule`), drops the ``K_drop`` diagonals with
the smallest L2 norm and grows the ``K_drop`` inactive diagonals whose dense gradient has the largest L2 norm.
Grown diagonals start at zero and their optimizer state is reset; kept ones keep theirs.

**Where the dense gradient comes from.** A frozen layer stores only its ``K`` diagonals, so autograd gives the
gradient of those alone. The gradient of every candidate diagonal is the matching diagonal of the dense
``dL/dW = sum_n g_n^T x_n`` (``g = dL/dy``, ``x`` the layer input). On update steps only, a forward hook keeps the
layer input and hooks the output's gradient, which adds ``g^T x`` (one ``[out, in]`` GEMM per layer, the cost
of a dense weight gradient; for a convolution the dense kernel gradient ``[out, in, kh, kw]`` from
``torch.nn.grad.conv2d_weight``, scored per diagonal over all its taps, as :class:`~dynadiag.DiagConv2d` shares one
choice of diagonals across taps) into an accumulator; between updates nothing is captured and the layer runs its
sparse kernels. This needs no change to :class:`~dynadiag.DiagLinear` and no dense weight kept around, and
micro-batches (gradient accumulation) simply add up. Under DDP the accumulated gradient is all-reduced (it is
per-rank data, not a synchronised parameter gradient) before scoring, so every rank picks the same diagonals.

The update edits ``V`` and ``offsets`` in place (same shapes, rows re-sorted by offset), so the optimizer, DDP and
compiled graphs keep their references; nothing is re-created.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.distributed import all_reduce_mean
from dynadiag.functional import gather_diagonals
from dynadiag.groups import group_offsets, group_scores
from dynadiag.layers import DiagLinear
from dynadiag.methods.base import SparseMethod
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.sparsify import DiagSparsifyConfig, sparsify_
from dynadiag.sparsity import SparsifyReport, sparsity_report

__all__ = ["DiagHeurMethod", "swap_diagonals_"]


@torch.no_grad()
def swap_diagonals_(
    layer: DiagLinear | DiagConv2d,
    keep_rows: torch.Tensor,
    grow: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Replace a frozen layer's dropped diagonals by ``grow`` (zero-initialised), in place.

    Args:
        layer: a frozen DiagLinear (``V [k, D]``) or DiagConv2d (``V [k, D, taps]``) with ``k`` diagonals.
        keep_rows: rows of ``layer.V`` kept, ``[k - n]``.
        grow: diagonal ids to add, ``[n]``, disjoint from the kept offsets.
        optimizer: its per-element state of ``V`` follows the rows; grown rows get zero state.
    """
    offsets = torch.cat([layer.offsets[keep_rows], grow.to(layer.offsets)])  # [k]
    if offsets.numel() != layer.k or offsets.unique().numel() != layer.k:
        raise ValueError(f"swap_diagonals_: need {layer.k} distinct diagonals, got {offsets.tolist()}")
    order = torch.argsort(offsets)

    def moved(value: torch.Tensor) -> torch.Tensor:  # [k, D(, taps)] rows of the new layout
        fresh = torch.cat([value[keep_rows], value.new_zeros(grow.numel(), *value.shape[1:])])
        return fresh[order]

    state = optimizer.state.get(layer.V) if optimizer is not None else None
    for value in (state or {}).values():
        if torch.is_tensor(value) and value.shape == layer.V.shape:
            value.copy_(moved(value))
    layer.V.copy_(moved(layer.V))
    layer.offsets.copy_(offsets[order])


def _group_swap(
    layer: DiagLinear, drop_score: torch.Tensor, grow_score: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiagHeur on whole groups: drop the kept groups with the smallest L2 norm, grow the inactive groups whose dense
    gradient has the largest L2 norm. Returns the kept rows of ``V`` and the grown diagonal offsets."""
    g = layer.group
    row_group = layer.offsets // g  # [K] group of each kept row
    kept = row_group.unique()  # [Gk] ascending
    n_drop = int(fraction * kept.numel())
    if n_drop == 0:
        return torch.arange(layer.k, device=layer.offsets.device), layer.offsets.new_zeros(0)
    norms = torch.zeros(layer.num_groups, device=drop_score.device).index_add_(0, row_group, drop_score.square())
    keep_groups = kept[torch.topk(norms[kept], kept.numel() - n_drop, sorted=False).indices]
    grow_groups_score = group_scores(grow_score, g)  # [G]
    grow_groups_score[kept] = torch.finfo(torch.float32).min  # kept groups cannot be grown again
    grow_groups = torch.topk(grow_groups_score, n_drop, sorted=False).indices
    keep_rows = torch.isin(row_group, keep_groups).nonzero().flatten()
    return keep_rows, group_offsets(grow_groups, layer.num_diagonals, g)


class DiagHeurMethod(SparseMethod):
    """DiagHeur baseline.

    Args:
        config: which layers become (always frozen) diagonal layers (``config.convs``: the target ``nn.Conv2d``
            layers too, as :class:`DiagConv2d`), at what sparsity (``K`` as in DynaDiag), with which kernel backend;
            ``config.group``: drop and grow whole groups of that many consecutive offsets (:mod:`dynadiag.groups`;
            linear layers only, and the group must divide every layer's ``P`` so each swap keeps ``k`` diagonals);
            ``config.permute``: a fixed random input permutation per linear layer.
        schedule: when to drop/grow and what fraction of each layer's ``K`` diagonals (default: RigL's).
        seed: seeds the initial random choice of diagonals (the same on every rank).
    """

    name = "diag_heur"

    def __init__(self, config: DiagSparsifyConfig, schedule: RegrowSchedule | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule if schedule is not None else RegrowSchedule()
        self.seed = int(seed)
        self.layers: list[tuple[str, DiagLinear | DiagConv2d]] = []
        self._armed = False
        self._grads: dict[str, torch.Tensor] = {}  # name -> accumulated dense dL/dW, [out, in(, kh, kw)] fp32
        self._handles: list[Any] = []

    @property
    def sparsity(self) -> float:
        return self.config.sparsity

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.schedule.total_steps = self.total_steps

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> SparsifyReport:
        """Convert the target layers to diagonal layers, each frozen on ``K`` random diagonals."""
        params_before = sum(p.numel() for p in model.parameters())
        converted = sparsify_(model, self.config)
        generator = torch.Generator().manual_seed(self.seed)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]
        for name, layer in self.layers:
            if layer.group > 1 and layer.num_diagonals % layer.group:
                raise ValueError(
                    f"diag_heur: group={layer.group} does not divide P={layer.num_diagonals} of '{name}' (a swap "
                    "involving the short last group would change the layer's diagonal count)"
                )
            # random importance -> freeze keeps K uniformly random diagonals (groups) (RigL's random initial topology)
            layer.alpha.copy_(torch.rand(layer.alpha.numel(), generator=generator))
            layer.freeze_()
            self._handles.append(layer.register_forward_hook(self._capture_hook(name)))
        report = sparsity_report(model)
        return SparsifyReport(report.layers, params_before, report.model_params_after, dense=converted.dense)

    # ------------------------------------------------------------------ dense gradient capture
    def _capture_hook(self, name: str):
        def hook(module: DiagLinear | DiagConv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self._armed or not output.requires_grad:
                return
            x = inputs[0].detach()  # [..., in] or [B, C_in, H, W]
            if getattr(module, "perm", None) is not None:  # the diagonals act on the permuted features
                x = torch.gather(x, -1, module.perm.expand(*x.shape[:-1], -1))

            def accumulate(grad: torch.Tensor) -> None:
                if isinstance(module, DiagConv2d):  # [out, in, kh, kw]
                    shape = (module.out_channels, module.in_channels, *module.kernel_size)
                    dense = torch.nn.grad.conv2d_weight(
                        x.float(), shape, grad.detach().float(), module.stride, module.padding, module.dilation
                    )
                else:  # [out, in]
                    g = grad.detach().reshape(-1, module.out_features)  # [N, out]
                    dense = g.t().float() @ x.reshape(-1, module.in_features).float()
                self._grads[name] = dense if name not in self._grads else self._grads[name] + dense

            output.register_hook(accumulate)

        return hook

    def on_step_start(self, step: int, model: nn.Module) -> dict[str, float]:
        self._armed = self.schedule.is_update_step(step)
        self._grads = {}
        return {}

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self._armed = False  # the backward is done; later forwards (eval, next step) capture nothing
        return {}

    def diagonal_grad_norms(self, name: str, layer: DiagLinear | DiagConv2d) -> torch.Tensor:  # [P]
        """L2 norm of the dense gradient along each of the layer's ``P`` candidate diagonals (over all kernel taps)."""
        dense = all_reduce_mean(self._grads[name])
        if dense.dim() == 2:
            return gather_diagonals(dense).norm(dim=1)
        taps = dense.flatten(2)  # [out, in, taps]
        per_tap = torch.stack([gather_diagonals(taps[..., i]) for i in range(taps.shape[-1])], dim=-1)  # [P, D, taps]
        return per_tap.flatten(1).norm(dim=1)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        grads_ready = bool(self._grads)
        if not self.schedule.is_update_step(step) or not grads_ready:
            self._grads = {}
            return {}
        fraction = self.schedule.fraction(step)
        regrown = new = 0
        lowest = torch.finfo(torch.float32).min
        for name, layer in self.layers:
            if name not in self._grads:
                continue
            grow_score = self.diagonal_grad_norms(name, layer).nan_to_num(0.0)  # [P]
            drop_score = all_reduce_mean(layer.V.detach().float().flatten(1).norm(dim=1))  # [K]
            if layer.group > 1:
                keep_rows, grow = _group_swap(layer, drop_score, grow_score, fraction)
                n_drop = grow.numel()
                if n_drop == 0:
                    continue
            else:
                n_drop = int(fraction * layer.k)
                if n_drop == 0:
                    continue
                keep_rows = torch.topk(drop_score, layer.k - n_drop, sorted=False).indices
                grow_score[layer.offsets[keep_rows]] = lowest  # kept diagonals cannot be grown again
                grow = torch.topk(grow_score, n_drop, sorted=False).indices
            new += int((~torch.isin(grow, layer.offsets)).sum())
            swap_diagonals_(layer, keep_rows, grow, optimizer)
            regrown += n_drop
        self._grads = {}
        return {
            f"{self.name}/drop_fraction": fraction,
            f"{self.name}/num_regrown": float(regrown),
            f"{self.name}/num_new": float(new),
        }
