"""Sparse DynaDiag: soft diagonal selection that runs sparse from step 0 and converges to exactly K diagonals.

The project's improved DynaDiag (``sparsifier=sparse_dynadiag``; ``sparsifier=dynadiag`` stays the paper's method).
Every target ``nn.Linear`` becomes a :class:`~dynadiag.candidate_layer.CandidateDiagLinear`, which computes with a
candidate set of ``K'`` diagonals through the sparse kernels, each weighted by a straight-through mix of a soft
(sigmoid around the ``K``-boundary, temperature relative to the layer's alpha spread) and a hard top-``K`` weight.

Schedules (pure functions of the step; ``F`` = ``freeze_fraction`` of the run):

- **candidates** ``K'(t) = K + ceil((c - 1) K (1 - t/F)^3)``: ``c * K`` at the start, ``K`` at the freeze (the cubic
  of gradual magnitude pruning), applied on update steps;
- **temperature** cosine from ``t_max`` to ``t_min`` over ``[0, F]`` (unitless: relative to the alpha spread);
- **hardness** ``h = (t / (F - 1))^harden_power``: 0 at the start, exactly 1 on the last soft step, so the forward
  pass there is the hard top-``K`` and the freeze changes nothing;
- **drop/grow** every ``delta_t`` steps before ``F`` (RigL's cadence, via DiagHeur's
  :class:`~dynadiag.methods.regrow.RegrowSchedule`): keep the ``K' - n`` candidates with the highest ``drop_score``,
  grow the ``n`` non-kept diagonals whose *dense* gradient has the largest norm (DiagHeur's capture hooks, armed on
  update steps only), with ``n = swap_fraction(t) * K``. Diagonals outside the candidate set therefore keep a way
  in, which a straight-through top-K that only runs the selected diagonals lacks (they would never train).

**Groups** (``config.group = g > 1``, :mod:`dynadiag.groups`): the selection units are groups of ``g`` consecutive
offsets instead of single diagonals. Everything above then counts groups: ``K`` becomes ``k_groups = min(G,
ceil(K/g))`` of ``G = ceil(P/g)`` (the last group may be short), the candidate set holds ``ceil(c * k_groups)``
groups shrinking to ``k_groups``, ``alpha`` is per group, the drop score is the group's weight times the L2 norm
of its values (or its alpha), and the grow score is the L2 norm of the dense gradient over the group's diagonals
(as DiagHeur scores groups). ``config.permute`` gives each layer a fixed input permutation (the capture hooks
gather the inputs the same way). ``g = 1`` is the ungrouped method, unchanged.

Each layer's ``V`` stores the candidate diagonals' rows only (:class:`~dynadiag.candidate_layer.CandidateDiagLinear`),
so the trainer's optimizer and the gradients touch at most ``c K`` rows per layer instead of ``P``. With
``stable_params`` (the default) ``V`` keeps its initial ``c K`` rows and an update rewrites rows and their optimizer
state in place (kept rows keep their values and state, grown ones start at zero), so the parameters never change
until the freeze; without it an update replaces ``V`` by a ``[K', D]`` parameter and sets ``topology_changed``. The
freeze shrinks ``V`` to ``[K, D]`` and sets ``topology_changed`` either way.

``alpha`` lives outside the trainer's optimizer (a grad-requiring buffer) and is trained here by AdamW with its own
lr (``alpha_lr_mult`` x the trainer's current lr) and weight decay; its state is in :meth:`state_dict`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynadiag.candidate_layer import CandidateDiagLinear, replace_with_candidates_
from dynadiag.distributed import all_reduce_mean
from dynadiag.groups import group_scores
from dynadiag.methods.diag_heur import DiagHeurMethod
from dynadiag.methods.dynadiag import freeze_all_
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.sparsify import DiagSparsifyConfig, sparsify_
from dynadiag.sparsity import SparsifyReport, sparsity_report

__all__ = ["SparseDynaDiagMethod", "candidate_count"]

DROP_SCORES = ("alpha", "magnitude")


def candidate_count(k: int, num_units: int, density_start: float, done: int, freeze_step: int) -> int:
    """``K'`` after ``done`` steps: ``K + ceil((c - 1) K (1 - done / F)^3)``, capped at ``num_units``; ``K`` from ``F``
    on. Units are diagonals (``K``, ``P``) or, for grouped layers, groups (``k_groups``, ``G``)."""
    if done >= freeze_step:
        return k
    remaining = (1.0 - done / max(1, freeze_step)) ** 3
    return min(num_units, k + math.ceil((density_start - 1.0) * k * remaining - 1e-9))


class SparseDynaDiagMethod(DiagHeurMethod):
    """Sparse DynaDiag (see the module docstring).

    Args:
        config: which ``nn.Linear`` layers become candidate layers (``include``/``exclude``), at what sparsity
            (``K`` as in DynaDiag), with which kernel backend (soft and frozen phase), group size ``group`` (select
            groups of that many consecutive offsets; ``k_groups`` of them are kept) and input permutation
            (``permute``, ``permute_seed``). Convolutions are never converted.
        density_start: ``c``: candidates per kept diagonal at the start (``c * K``, at most ``P``).
        freeze_fraction: fraction of the run after which each layer keeps exactly its top ``K`` candidates.
        delta_t: optimizer steps between candidate updates (drop/grow and shrinking).
        swap_fraction: fraction of ``K`` swapped at the first update, decayed to 0 at the freeze.
        swap_decay: ``cosine``, ``linear`` or ``constant`` decay of ``swap_fraction``.
        swap_rounding: how ``swap_fraction * K`` becomes a count: ``floor`` (RigL's rule) or ``ceil`` (at least one
            unit per update while the fraction is above 0: layers with few kept units, e.g. ``K = 4`` at 98 % or
            grouped layers, otherwise stop exploring after the first update).
        t_max: starting temperature, relative to each layer's alpha spread.
        t_min: temperature at the freeze.
        harden_power: shape of the hardness ramp ``(t / (F - 1))^p`` (1: linear; larger: later).
        alpha_lr_mult: alpha's lr as a multiple of the trainer's current lr.
        alpha_weight_decay: AdamW weight decay of alpha.
        drop_score: which candidates survive an update: ``alpha`` (the learned importance) or ``magnitude``
            (``w * ||V||`` of the diagonal, DiagHeur's criterion).
        grow_init: grown diagonals start at ``zero`` (RigL) or ``keep`` the values they had when they left the
            candidate set (their initial values if they never were in it). ``V`` stores the candidates only, so a
            diagonal outside the set is not weight-decayed meanwhile (it was when all ``P`` rows were stored).
        normalize: scale the soft weights so the top ``K`` average 1 (see ``candidate_weights``).
        label: the method's name in summaries, tables and metric prefixes (default ``sparse_dynadiag``), so a
            variant run beside the default forms its own row.
        stable_params: keep each layer's ``V`` at its initial candidate capacity and change the candidate set in
            place (the stable layout of :class:`~dynadiag.candidate_layer.CandidateDiagLinear`): the parameter
            objects stay the same from :meth:`apply_` to the freeze, so DDP, ``torch.compile``, EMA copies and
            optimizers built outside follow every candidate update; the freeze still shrinks ``V`` once (and sets
            ``topology_changed``). ``False``: ``V`` shrinks with the candidate set (a new parameter per update).
        seed: seeds the initial random alpha (hence the initial candidate set).
    """

    name = "sparse_dynadiag"

    def __init__(
        self,
        config: DiagSparsifyConfig,
        density_start: float = 3.0,
        freeze_fraction: float = 0.5,
        delta_t: int = 100,
        swap_fraction: float = 0.3,
        swap_decay: str = "cosine",
        swap_rounding: str = "floor",
        t_max: float = 1.0,
        t_min: float = 0.05,
        harden_power: float = 1.0,
        alpha_lr_mult: float = 1.0,
        alpha_weight_decay: float = 0.0,
        drop_score: str = "magnitude",
        grow_init: str = "zero",
        normalize: bool = False,
        label: str | None = None,
        seed: int = 0,
        stable_params: bool = True,
    ) -> None:
        if not 0.0 < float(freeze_fraction) <= 1.0:
            raise ValueError(f"freeze_fraction must be in (0, 1], got {freeze_fraction}")
        super().__init__(
            config,
            RegrowSchedule(delta_t=delta_t, drop_fraction=swap_fraction, t_end=freeze_fraction, decay=swap_decay),
            seed=seed,
        )
        if float(density_start) < 1.0:
            raise ValueError(f"density_start must be >= 1 (candidates per kept diagonal), got {density_start}")
        if not 0 < t_min <= t_max:
            raise ValueError(f"temperatures need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if swap_rounding not in ("floor", "ceil"):
            raise ValueError(f"swap_rounding must be 'floor' or 'ceil', got '{swap_rounding}'")
        self.swap_rounding = swap_rounding
        if drop_score not in DROP_SCORES:
            raise ValueError(f"unknown drop_score '{drop_score}'; choose one of {list(DROP_SCORES)}")
        if grow_init not in ("zero", "keep"):
            raise ValueError(f"grow_init must be zero or keep, got {grow_init!r}")
        self.density_start, self.freeze_fraction = float(density_start), float(freeze_fraction)
        self.t_max, self.t_min, self.harden_power = float(t_max), float(t_min), float(harden_power)
        self.alpha_lr_mult, self.alpha_weight_decay = float(alpha_lr_mult), float(alpha_weight_decay)
        self.drop_score, self.grow_init, self.normalize = drop_score, grow_init, bool(normalize)
        self.stable_params = bool(stable_params)
        self.freeze_step = 1
        if label:
            self.name = str(label)
        self._alpha_opt: torch.optim.Optimizer | None = None
        self._alpha_state: dict[str, Any] | None = None  # loaded before the alpha optimizer exists

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.freeze_step = max(1, self.schedule.end_step)

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> SparsifyReport:
        """Convert the target ``nn.Linear`` layers; each starts with ``c * k_groups`` random candidate units.

        Raises:
            ValueError: ``config.group`` does not fit a layer (it would keep all of the layer's groups).
        """
        params_before = sum(p.numel() for p in model.parameters())
        sparsify_(model, self.config, filter_fn=lambda module, name: isinstance(module, nn.Linear))
        self.layers = replace_with_candidates_(model)
        for name, layer in self.layers:
            if layer.group > 1 and layer.k_groups >= layer.num_groups:
                raise ValueError(
                    f"{self.name}: group={layer.group} does not fit layer '{name}' ({layer.in_features}->"
                    f"{layer.out_features}, P={layer.num_diagonals} diagonals in {layer.num_groups} groups): it would "
                    f"keep all {layer.num_groups} groups; use a smaller group or a higher sparsity"
                )
        generator = torch.Generator().manual_seed(self.seed)
        for name, layer in self.layers:
            layer.alpha.detach().copy_(torch.rand(layer.num_groups, generator=generator))  # random initial ranking
            count = candidate_count(layer.k_groups, layer.num_groups, self.density_start, 0, self.freeze_step)
            if self.grow_init == "keep":  # before V shrinks to the candidates: every diagonal's initial values
                layer.keep_dropped_values_()
            layer.set_candidates_(torch.topk(layer.alpha.detach(), count).indices)  # V keeps these rows only
            if self.stable_params:  # the set only shrinks from here: its diagonals (full-sized groups) always fit
                layer.enable_stable_storage_(count * layer.group)
            self._handles.append(layer.register_forward_hook(self._capture_hook(name)))
        report = sparsity_report(model)
        return SparsifyReport(report.layers, params_before, report.model_params_after)

    def _soft_layers(self) -> list[tuple[str, CandidateDiagLinear]]:
        return [(n, m) for n, m in self.layers if not m.is_frozen]

    # ------------------------------------------------------------------ schedules
    def temperature(self, step: int) -> float:
        frac = min(max(step / self.freeze_step, 0.0), 1.0)
        return self.t_min + 0.5 * (self.t_max - self.t_min) * (1.0 + math.cos(math.pi * frac))

    def hardness(self, step: int) -> float:
        last = self.freeze_step - 1  # the last soft step runs fully hard
        return 1.0 if last <= 0 else min(1.0, max(step, 0) / last) ** self.harden_power

    def will_freeze(self, step: int, model: nn.Module) -> bool:
        return step + 1 >= self.freeze_step and bool(self._soft_layers())

    # ------------------------------------------------------------------ hooks
    def on_step_start(self, step: int, model: nn.Module) -> dict[str, float]:
        super().on_step_start(step, model)  # arms DiagHeur's dense-gradient capture on update steps
        soft = self._soft_layers()
        if not soft:
            return {}
        temperature, hardness = self.temperature(step), self.hardness(step)
        for _, layer in soft:
            layer.temperature, layer.hardness, layer.normalize = temperature, hardness, self.normalize
            if not layer.alpha.is_leaf:  # .to(device) of a grad-requiring buffer returns a non-leaf copy
                layer.alpha = layer.alpha.detach().requires_grad_()
            layer.alpha.grad = None
        # the cached candidate ids: no host sync per step (the set only changes on update steps)
        ratio = sum(m.candidate_ids().numel() / m.k_groups for _, m in soft) / len(soft)
        return {"temperature": temperature, "hardness": hardness, "candidates_per_k": ratio}

    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        done = step + 1
        if not self._soft_layers():
            self._grads = {}
            return {}
        if done >= self.freeze_step:  # before alpha moves: the kept set is the one this step's forward used
            freeze_all_(model, optimizer)
            self.topology_changed = True
            self._alpha_opt, self._alpha_state, self._grads = None, None, {}
            return {"frozen": 1.0}
        self._alpha_step(optimizer)
        metrics = self._update_candidates(step, optimizer) if self.schedule.is_update_step(step) else {}
        self._grads = {}
        return metrics

    def _alpha_step(self, optimizer: torch.optim.Optimizer) -> None:
        alphas = [layer.alpha for _, layer in self._soft_layers()]
        held = [id(p) for p in self._alpha_opt.param_groups[0]["params"]] if self._alpha_opt is not None else None
        if held != [id(a) for a in alphas]:
            betas = optimizer.param_groups[0].get("betas", (0.9, 0.999))
            # one kernel (fused, as the trainer's AdamW when it is fused) or one op per step over all layers'
            # alphas (foreach: the same result as torch's per-tensor loop) instead of ~10 ops per layer
            fast = {"fused": True} if optimizer.defaults.get("fused") else {"foreach": True}
            self._alpha_opt = torch.optim.AdamW(
                alphas, lr=1.0, betas=betas, weight_decay=self.alpha_weight_decay, **fast
            )
            if self._alpha_state is not None:
                self._alpha_opt.load_state_dict(self._alpha_state)
                self._alpha_state = None
        grads = [alpha.grad for alpha in alphas if alpha.grad is not None]
        for grad in grads:
            grad.copy_(all_reduce_mean(grad))
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one host sync
            return  # e.g. an fp16 loss-scale overflow: the trainer's scaler skipped this step too
        # the trainer's rate without timm's layer-wise decay factor (lr_scale: group 0 holds the shallowest layer)
        group = optimizer.param_groups[0]
        self._alpha_opt.param_groups[0]["lr"] = group["lr"] / group.get("lr_scale", 1.0) * self.alpha_lr_mult
        self._alpha_opt.step()

    def swap_count(self, fraction: float, k: int) -> int:
        """Units to swap at an update: ``fraction * k`` rounded as ``swap_rounding`` says."""
        return math.ceil(fraction * k - 1e-9) if self.swap_rounding == "ceil" else int(fraction * k)

    def _update_candidates(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Shrink each soft layer's candidate set to the schedule and swap units (diagonals or groups).

        Every count and id here is in selection units (``k_groups`` of ``G``; diagonals for ``group=1``).
        """
        done, fraction = step + 1, self.schedule.fraction(step)
        grown_total = new_total = 0
        for name, layer in self._soft_layers():
            if name not in self._grads:
                continue
            ids, g, k = layer.candidate_ids(), layer.group, layer.k_groups
            target = candidate_count(k, layer.num_groups, self.density_start, done, self.freeze_step)
            target = min(target, ids.numel())  # the set only shrinks; growth replaces what was dropped
            n_grow = min(self.swap_count(fraction, k), target - 1)
            alpha = layer.alpha.detach()
            if self.drop_score == "alpha":
                score = alpha[ids].float()
            else:  # the unit's weight times the L2 norm of its values (V holds the candidate diagonals' rows)
                norms = layer.candidate_values().detach().float().norm(dim=1)  # [K']
                if g > 1:  # the group's norm over all of its diagonals
                    full = norms.new_zeros(layer.num_diagonals)
                    full[layer.candidate_offsets()] = norms
                    norms = group_scores(full, g)[ids]
                score = layer.candidate_weights().float() * norms
            keep = ids[torch.topk(all_reduce_mean(score), target - n_grow).indices]
            grow_score = group_scores(self.diagonal_grad_norms(name, layer).nan_to_num(0.0), g)  # [G]
            grow_score[keep] = -torch.inf
            grow = torch.topk(grow_score, n_grow).indices if n_grow > 0 else keep[:0]
            new = grow[~torch.isin(grow, ids)]
            fresh = torch.zeros(layer.num_groups, dtype=torch.bool, device=alpha.device)
            fresh[grow] = True
            if grow.numel():
                # a grown unit enters just below the K-boundary of the kept ones (midway to the next): a fair
                # chance to be selected, without tying with (and so displacing) a kept unit of the hard set
                ranked = torch.sort(alpha[keep], descending=True).values
                k_th = ranked[min(k, ranked.numel()) - 1]
                alpha[grow] = (k_th + ranked[k]) / 2 if ranked.numel() > k else k_th - 1.0
                self._reset_alpha_state(layer.alpha, fresh)
            # V becomes the new set's rows: grown units start at zero (grow_init=zero) with zero optimizer state,
            # kept ones keep theirs, dropped ones leave the storage and the optimizer
            changed = layer.set_candidates_(
                torch.cat([keep, grow]), fresh=fresh, optimizer=optimizer, zero_fresh=self.grow_init == "zero"
            )
            self.topology_changed |= changed  # new V parameters: the trainer rebuilds its DDP/compile wrappers
            grown_total += int(grow.numel())
            new_total += int(new.numel())
        return {
            f"{self.name}/swap_fraction": fraction,
            f"{self.name}/num_grown": float(grown_total),
            f"{self.name}/num_new": float(new_total),
        }

    def _reset_alpha_state(self, alpha: torch.Tensor, where: torch.Tensor) -> None:
        if self._alpha_opt is not None:
            for value in self._alpha_opt.state.get(alpha, {}).values():
                if torch.is_tensor(value) and value.shape == alpha.shape:
                    value[where] = 0.0

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self._alpha_opt is not None:
            return {"alpha_optimizer": self._alpha_opt.state_dict()}
        return {"alpha_optimizer": self._alpha_state} if self._alpha_state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._alpha_state = state.get("alpha_optimizer")
        self._alpha_opt = None
