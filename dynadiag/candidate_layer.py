"""``CandidateDiagLinear``: a soft-phase DiagLinear that computes with a candidate set of diagonals only.

The paper's soft phase weights all ``P`` diagonals, so it is a dense layer (scaled by ~``K/P``) until the freeze.
This layer computes with a *candidate set* of ``K' >= K`` diagonals (a boolean buffer, changed by
:class:`~dynadiag.methods.sparse_dynadiag.SparseDynaDiagMethod`) through the same sparse kernels the frozen layer
uses, with a per-diagonal weight folded into the values::

    V_eff = w[:, None] * V                      # [K', D]; autograd carries dL/dw to alpha and dL/dV_eff to V
    y = diag_linear(x, V_eff, candidate_offsets) + b

**Storage.** ``V`` holds the candidates' rows only, so the gradient, the optimizer step and weight decay touch
``K'`` rows, not ``P`` (``P/K = 10`` at 90 % sparsity, 50 at 98 %). Two layouts:

- *compact* (default of a new layer): ``V`` is ``[K', D]``, row ``i`` is diagonal ``candidate_offsets()[i]``
  (ascending). Changing the set (:meth:`set_candidates_`) makes ``V`` a new parameter, as the freeze does.
- *stable* (:meth:`enable_stable_storage_`, sparse DynaDiag's default): ``V`` is ``[R, D]`` for a fixed capacity
  ``R >= K'`` and the buffer ``slots`` ``[R]`` says which diagonal each row holds (``-1``: a free row, kept at zero).
  Changing the set rewrites rows, ``slots`` and the optimizer's per-row state **in place**, so the parameter object
  never changes and DDP, ``torch.compile``, EMA copies and optimizers built outside keep working; the forward pass
  gathers the candidate rows in ascending offset order (``V.index_select``). Only the freeze replaces ``V`` (it
  shrinks to ``[K, D]``).

Either way the rows of units that stay keep their values and optimizer state, the others start at zero with zero
state (or, with :meth:`keep_dropped_values_`, at the values they had when they left). A diagonal outside the set has
no influence on the output, so with zero-initialised growth this trains exactly as storing all ``P`` rows would.

The weight of candidate ``p`` is a straight-through mix of a soft and a hard selection::

    soft_p = sigmoid((alpha_p - theta) / (T * sigma))   # theta: midway between the K-th and (K+1)-th alpha
    hard_p = 1 if p is among the K largest alpha else 0  # sigma: the std of the candidates' alpha (temperature
    w_p    = soft_p + h * (hard_p - soft_p).detach()     #        relative to the layer's own alpha spread)

so the selected diagonals weigh about 1 (no ``K/P`` shrink of the output), the temperature ``T`` is unitless, and
the hardness ``h`` ramps to 1 by the freeze: then ``w`` is exactly the top-``K`` indicator, the candidate set holds
``K`` diagonals, and :meth:`freeze_` (which keeps the top ``K`` candidates with weight 1) changes nothing.

**Groups and permutations** (:mod:`dynadiag.groups`). With ``group=g > 1`` the selection units are the
``G = ceil(P/g)`` groups of ``g`` consecutive offsets (the last one short when ``g`` does not divide ``P``):
``alpha`` and ``candidates`` are ``[G]``, the weights above are computed per candidate group with ``K`` replaced by
``k_groups = min(G, ceil(K/g))``, and each group's weight multiplies all of its diagonals. The kernels see the
candidate groups' diagonal offsets (runs of consecutive offsets). A fixed input permutation is applied to ``x``
exactly as :class:`~dynadiag.layers.DiagLinear` does (a gather, or fused by backends that can), so the soft phase,
the frozen layer and ``weight`` agree. ``group=1`` is the ungrouped layer (every helper is then the identity).

``alpha`` is a buffer that requires grad, not an ``nn.Parameter``: the method trains it with its own optimizer
(own lr multiplier and weight decay) and the trainer's optimizer never sees it. Once frozen, the layer is an
ordinary frozen DiagLinear (``K`` rows, sparse kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag import functional as DF
from dynadiag import groups as DG
from dynadiag.kernels import get_backend
from dynadiag.layers import DiagLinear
from dynadiag.optim import replace_parameter_rows_

__all__ = ["CandidateDiagLinear", "candidate_weights", "hard_top_k", "weighted_candidate_rows"]


def hard_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``logits`` (``[K']`` -> ``[k]``), ties broken by position.

    The one ranking of the hard selection: the forward pass and the freeze both use it, so they keep the same set.
    """
    return torch.sort(logits.detach().float(), descending=True, stable=True).indices[:k]


def candidate_weights(
    alpha: torch.Tensor, k: int, temperature: float, hardness: float, normalize: bool = False
) -> torch.Tensor:
    """Straight-through mix of soft and hard top-``k`` weights of candidate logits (see the module docstring).

    Args:
        alpha: logits of the candidates, ``[K']``.
        k: how many the hard selection keeps (``k <= K'``).
        temperature: unitless; the soft weights see ``(alpha - theta) / (temperature * std(alpha))``.
        hardness: ``h`` in ``[0, 1]``; forward value ``(1 - h) * soft + h * hard``, gradient that of ``soft``.
        normalize: divide ``soft`` by the (detached) mean soft weight of the top ``k``, so the selected
            diagonals weigh ~1 at every temperature instead of ~0.5-1.

    Returns:
        Per-candidate weights in ``[0, 1]``, ``[K']``; exactly the hard top-``k`` indicator when ``hardness == 1``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = alpha.float()
    count = logits.numel()
    with torch.no_grad():
        order = torch.sort(logits, descending=True, stable=True)
        top = order.values[: min(k + 1, count)]
        theta = (top[k - 1] + top[k]) / 2 if count > k else top[k - 1] - logits.std(unbiased=False)
        sigma = logits.std(unbiased=False).clamp_min(1e-6) if count > 1 else logits.new_tensor(1.0)
        hard = torch.zeros_like(logits)
        hard[order.indices[:k]] = 1.0
    soft = torch.sigmoid((logits - theta) / (temperature * sigma))
    if normalize:
        soft = soft / soft.detach()[order.indices[:k]].mean()
    weights = soft + float(hardness) * (hard - soft).detach()
    return weights.to(alpha.dtype)


class _WeightedRows(torch.autograd.Function):
    """``values * candidate_weights(alpha[ids], ...)[:, None]`` as one autograd node (group 1).

    The same arithmetic as the composed ops, op for op (so training is bit-identical), with one graph node instead of
    about ten and a backward of six ops instead of about twenty: the soft phase calls it for every layer and step.
    """

    @staticmethod
    def forward(ctx, values, alpha, ids, k, temperature, hardness, normalize):  # values [K', D], alpha [G], ids [K']
        logits = alpha[ids].float()  # [K']
        count = logits.numel()
        order = torch.sort(logits, descending=True, stable=True)
        top = order.values[: min(k + 1, count)]
        spread = logits.std(unbiased=False)
        theta = (top[k - 1] + top[k]) / 2 if count > k else top[k - 1] - spread
        sigma = spread.clamp_min(1e-6) if count > 1 else logits.new_tensor(1.0)
        hard = torch.zeros_like(logits)
        hard[order.indices[:k]] = 1.0
        scale = temperature * sigma
        soft = torch.sigmoid((logits - theta) / scale)
        norm = soft[order.indices[:k]].mean() if normalize else None
        shown = soft / norm if normalize else soft
        weights = (shown + float(hardness) * (hard - shown)).to(alpha.dtype).to(values.dtype)  # [K']
        ctx.save_for_backward(values, alpha, ids, weights, soft, scale, norm)
        return values * weights[:, None]

    @staticmethod
    def backward(ctx, grad):  # grad [K', D]
        values, alpha, ids, weights, soft, scale, norm = ctx.saved_tensors
        grad_values = grad * weights[:, None] if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * values).sum(1, keepdim=True).view(-1).float()  # the straight-through mix passes it on
            if norm is not None:
                grad_w = grad_w / norm
            grad_logits = torch.ops.aten.sigmoid_backward(grad_w, soft) / scale
            grad_alpha = alpha.new_zeros(alpha.shape).index_put_((ids,), grad_logits.to(alpha.dtype), accumulate=True)
        return grad_values, grad_alpha, None, None, None, None, None


def weighted_candidate_rows(
    values: torch.Tensor,  # [K', D]
    alpha: torch.Tensor,  # [G]
    ids: torch.Tensor,  # [K'] int64
    k: int,
    temperature: float,
    hardness: float,
    normalize: bool = False,
) -> torch.Tensor:  # [K', D]
    """``values * candidate_weights(alpha[ids], k, temperature, hardness, normalize)[:, None]`` in one autograd node;
    differentiable in ``values`` and ``alpha`` exactly as the composed expression is (same values, same gradients)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _WeightedRows.apply(values, alpha, ids, k, temperature, hardness, normalize)


class CandidateDiagLinear(DiagLinear):
    """DiagLinear whose soft phase runs sparse on a candidate set (constructor as :class:`DiagLinear`).

    Extra state: ``candidates`` (bool buffer ``[G]``, one flag per selection unit: a diagonal for ``group=1``, a
    group of ``group`` consecutive offsets otherwise, see :mod:`dynadiag.groups`), ``temperature`` (unitless,
    relative to the alpha spread) and ``hardness`` (``h``). ``alpha`` is ``[G]`` and the hard selection keeps
    ``k_groups`` units (``k_groups == k`` for ``group=1``); every diagonal of a unit takes the unit's weight. ``V``
    is ``[K', D]``: the candidate diagonals' rows only (``[P, D]`` while every unit is a candidate, as after
    construction). The input permutation (``perm``), if any, is applied as :class:`DiagLinear` applies it, so the soft
    phase, the frozen layer and :attr:`weight` agree. Build one from an existing layer with :meth:`from_diag_linear`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hardness = 0.0
        self.normalize = False  # see candidate_weights
        self.register_buffer("candidates", torch.ones(self.num_groups, dtype=torch.bool, device=self.V.device))
        # cached (unit ids [G'], diagonal offsets [K'], diagonals per unit [G']) of the candidate set
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # alpha is trained by the method's own optimizer: a grad-requiring buffer keeps it out of model.parameters()
        alpha = self.alpha.detach()
        del self.alpha
        self.register_buffer("alpha", alpha.requires_grad_())
        # [P, D] last values of the diagonals outside the set, only after keep_dropped_values_() (grow_init=keep)
        self.register_buffer("dropped_values", None)
        # [R] diagonal held by each row of V (-1: free) in the stable layout; None: compact (see the module docstring)
        self.register_buffer("slots", None)

    @classmethod
    def from_diag_linear(cls, layer: DiagLinear) -> CandidateDiagLinear:
        """A soft CandidateDiagLinear with ``layer``'s sizes, ``k``, group, permutation, values, alpha, bias and
        backend."""
        if layer.is_frozen:
            raise ValueError("CandidateDiagLinear.from_diag_linear needs a soft (unfrozen) DiagLinear")
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            sparsity=layer.sparsity,
            backend=layer.backend,
            group=layer.group,
            device=layer.V.device,
            dtype=layer.V.dtype,
        )
        new.k, new.layer_name = layer.k, layer.layer_name
        if layer.perm is not None:
            new.set_permutation_(layer.perm.clone())
        with torch.no_grad():
            new.V.copy_(layer.V)
            new.alpha.copy_(layer.alpha)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    # ------------------------------------------------------------------ candidate set
    def _candidate_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(unit ids [G'], diagonal offsets [K'], diagonals per unit [G'], rows of V of those offsets [K'] or None
        for the compact layout), computed once per candidate set."""
        if self._cache is None or self._cache[0].device != self.candidates.device:
            ids = torch.nonzero(self.candidates).flatten()
            if self.group == 1:
                offsets, sizes = ids, torch.ones_like(ids)
            else:
                sizes = DG.group_sizes(self.num_diagonals, self.group).to(ids.device)[ids]
                offsets = DG.group_offsets(ids, self.num_diagonals, self.group)
            rows = None
            if self.slots is not None:
                row_of = self._row_of()
                rows = row_of[offsets]
            self._cache = (ids, offsets, sizes, rows)
        return self._cache

    def _row_of(self) -> torch.Tensor:  # [P] int64: the row of V holding each diagonal, -1 where none
        held = torch.nonzero(self.slots >= 0).flatten()
        row_of = torch.full((self.num_diagonals,), -1, dtype=torch.long, device=self.slots.device)
        row_of[self.slots[held]] = held
        return row_of

    def candidate_ids(self) -> torch.Tensor:  # [G'] int64, ascending
        """Candidate selection units (diagonals for ``group=1``, group ids otherwise), ascending."""
        return self._candidate_cache()[0]

    def candidate_offsets(self) -> torch.Tensor:  # [K'] int64, ascending
        """Diagonal offsets of the candidate units (``candidate_ids()`` itself for ``group=1``)."""
        return self._candidate_cache()[1]

    def candidate_values(self) -> torch.Tensor:  # [K', D]
        """The candidate diagonals' values, in ``candidate_offsets()`` order (differentiable in ``V``)."""
        rows = self._candidate_cache()[3]
        return self.V if rows is None else self.V.index_select(0, rows)

    @property
    def is_stable(self) -> bool:
        """Whether ``V`` has the stable layout (changed in place by :meth:`set_candidates_`)."""
        return self.slots is not None

    @torch.no_grad()
    def enable_stable_storage_(self, capacity: int) -> None:
        """Switch to the stable layout with ``capacity`` rows (at least the current candidate count).

        ``V`` becomes a new ``[capacity, D]`` parameter once, here (call it before an optimizer is built); from then
        on :meth:`set_candidates_` changes rows in place. Needs ``capacity`` >= every later candidate count: sparse
        DynaDiag's set only shrinks (for groups: the diagonals of the initial number of groups, full-sized).
        """
        if self.is_frozen or self.slots is not None:
            return
        offsets, count = self.candidate_offsets(), self.candidate_offsets().numel()
        capacity = min(int(capacity), self.num_diagonals)
        if capacity < count:
            raise ValueError(f"enable_stable_storage_: capacity {capacity} < {count} candidate diagonals")
        values = self.V.new_zeros(capacity, *self.V.shape[1:])
        values[:count] = self.V.detach()
        slots = torch.full((capacity,), -1, dtype=torch.long, device=offsets.device)
        slots[:count] = offsets
        self.V = nn.Parameter(values, requires_grad=self.V.requires_grad)  # [R, D]
        self.slots = slots
        self._cache = None

    @torch.no_grad()
    def set_candidates_(
        self,
        ids: torch.Tensor,
        fresh: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        zero_fresh: bool = True,
    ) -> bool:
        """Make the units ``ids`` (``[G']``, ``G' >= k_groups``) the candidate set; ``V`` keeps their rows only.

        Args:
            ids: the new candidate units (diagonals for ``group=1``, group ids otherwise).
            fresh: ``[G]`` bool, units that (re)enter fresh: zero optimizer state, and zero values when
                ``zero_fresh`` (else the values they have now, or had when they left the set).
            optimizer: the optimizer of ``V``; it is moved to the new parameter, its per-element state following
                the rows (kept rows keep theirs, the others start at zero; scalar state such as ``step`` is kept).
            zero_fresh: whether ``fresh`` units start at zero (RigL's growth).

        Rows of units that stay (in the old and new set, not ``fresh``) keep their values. Units new to the set
        start at zero, or at their last values once :meth:`keep_dropped_values_` was called.

        Returns:
            Whether ``V`` was replaced by a new parameter (the set or a fresh unit changed, compact layout): modules
            wrapping the layer's parameters (DDP, compiled graphs, other optimizers) must be rebuilt. Always
            ``False`` in the stable layout, where rows change in place.
        """
        device = self.candidates.device
        mask = torch.zeros_like(self.candidates)
        mask[ids.to(device)] = True
        if int(mask.sum()) < self.k_groups:
            name = self.layer_name or "CandidateDiagLinear"
            raise ValueError(f"{name}: need >= {self.k_groups} candidates, got {ids}")
        fresh = torch.zeros_like(mask) if fresh is None else fresh.to(device=device, dtype=torch.bool) & mask
        if torch.equal(mask, self.candidates) and not bool(fresh.any()):
            return False
        if self.slots is not None:
            self._set_candidates_in_place_(mask, fresh, optimizer, zero_fresh)
            return False
        old_offsets, old = self.candidate_offsets(), self.V
        # per diagonal [P]: rows that keep their optimizer state (and values), and fresh rows
        carried = DG.expand_group_weights(self.candidates & mask & ~fresh, self.num_diagonals, self.group)
        fresh_diagonals = DG.expand_group_weights(fresh, self.num_diagonals, self.group)
        self.candidates.copy_(mask)
        self._cache = None
        new_offsets = self.candidate_offsets()
        src = torch.nonzero(carried[old_offsets]).flatten()  # rows of the old V, ascending by offset ...
        dst = torch.nonzero(carried[new_offsets]).flatten()  # ... and the same diagonals' rows in the new V
        if self.dropped_values is not None:  # every diagonal's last values: current rows, then those that left
            self.dropped_values[old_offsets] = old.detach()
            values = self.dropped_values[new_offsets].clone()
        else:  # only rows that stay have values; keep_fresh units that stay keep theirs too
            stay = carried if zero_fresh else carried | fresh_diagonals
            values = old.new_zeros(new_offsets.numel(), *old.shape[1:])
            values[stay[new_offsets]] = old.detach()[stay[old_offsets]]
        if zero_fresh:
            values[fresh_diagonals[new_offsets]] = 0.0
        self.V = nn.Parameter(values, requires_grad=old.requires_grad)  # [K', D]
        if optimizer is not None:
            replace_parameter_rows_(optimizer, old, self.V, src, dst)
        return True

    def _set_candidates_in_place_(
        self, mask: torch.Tensor, fresh: torch.Tensor, optimizer: torch.optim.Optimizer | None, zero_fresh: bool
    ) -> None:
        """:meth:`set_candidates_` in the stable layout: the same values and optimizer state, moved between rows of
        the same ``V`` (kept diagonals keep their rows; entering ones take free rows)."""
        P = self.num_diagonals
        carried = DG.expand_group_weights(self.candidates & mask & ~fresh, P, self.group)  # [P] keep values + state
        fresh_diagonals = DG.expand_group_weights(fresh, P, self.group)  # [P]
        wanted = DG.expand_group_weights(mask, P, self.group)  # [P] diagonals of the new set
        values, slots, row_of = self.V.detach(), self.slots, self._row_of()
        held = slots >= 0
        if self.dropped_values is not None:  # every stored diagonal's last values
            self.dropped_values[slots[held]] = values[held]
        keep_row = held & carried[slots.clamp_min(0)]  # [R]
        entering = torch.nonzero(wanted & ~carried).flatten()  # diagonals that need a (new) row
        free = torch.nonzero(~keep_row).flatten()
        if entering.numel() > free.numel():
            name = self.layer_name or "CandidateDiagLinear"
            raise ValueError(f"{name}: {int(wanted.sum())} candidate diagonals exceed the {slots.numel()} stored rows")
        if self.dropped_values is not None:
            new_values = self.dropped_values[entering].clone()
        else:  # entering diagonals start at zero; fresh ones already stored keep theirs unless zero_fresh
            new_values = values.new_zeros(entering.numel(), *values.shape[1:])
            if not zero_fresh:
                old_rows = row_of[entering]
                stored = old_rows >= 0
                new_values[stored] = values[old_rows[stored]]
        if zero_fresh:
            new_values[fresh_diagonals[entering]] = 0.0
        rows = free[: entering.numel()]
        values[~keep_row] = 0.0
        values[rows] = new_values
        slots.masked_fill_(~keep_row, -1)
        slots[rows] = entering
        state = optimizer.state.get(self.V) if optimizer is not None else None
        for value in (state or {}).values():  # per-row state (Adam moments) of rows not kept starts at zero
            if torch.is_tensor(value) and value.shape == self.V.shape:
                value[~keep_row] = 0
        self.candidates.copy_(mask)
        self._cache = None

    @torch.no_grad()
    def keep_dropped_values_(self) -> None:
        """From now on, units that leave the set keep their values (``[P, D]`` buffer) and come back with them."""
        if self.dropped_values is None:
            full = self.V.new_zeros(self.num_diagonals, *self.V.shape[1:])
            full[self.candidate_offsets()] = self.candidate_values().detach()
            self.dropped_values = full

    @property
    def soft_nnz(self) -> int:
        """Weights the soft phase computes with: ``K' * D`` (``K'`` candidate diagonals)."""
        return int(self.candidate_offsets().numel()) * self.diag_length

    def candidate_weights(self) -> torch.Tensor:  # [G']
        """Weights of the candidate units (differentiable in ``alpha``); hard top-``k_groups`` at full hardness."""
        ids = self.candidate_ids()
        return candidate_weights(self.alpha[ids], self.k_groups, self.temperature, self.hardness, self.normalize)

    def diagonal_weights(self) -> torch.Tensor:  # [K']
        """Weight of every candidate diagonal: its unit's weight (differentiable in ``alpha``)."""
        weights = self.candidate_weights()
        if self.group == 1:
            return weights
        _, offsets, sizes, _ = self._candidate_cache()
        return weights.repeat_interleave(sizes, output_size=offsets.numel())

    # ------------------------------------------------------------------ selection_stats hooks
    def selection_weights(self) -> torch.Tensor:  # [P]
        weights = torch.zeros(self.num_diagonals, device=self.V.device)
        if self.is_frozen:
            weights[self.offsets] = 1.0
            return weights
        weights[self.candidate_offsets()] = self.diagonal_weights().detach().float()
        return weights

    def selection_scores(self) -> torch.Tensor:  # [P]
        scores = self.alpha.detach().float().clone()
        scores[~self.candidates] = -torch.inf
        return DG.expand_group_weights(scores, self.num_diagonals, self.group)

    def selection_temperature(self) -> float:
        """The scale at which the soft weights see ``alpha``: ``T * std(alpha of the candidates)``."""
        alpha = self.alpha.detach()[self.candidate_ids()].float()
        return self.temperature * max(float(alpha.std(unbiased=False)), 1e-6)

    # ------------------------------------------------------------------ compute
    def _candidate_values(self) -> tuple[torch.Tensor, torch.Tensor]:  # ([K', D], [K'])
        if self.group == 1 and not torch.compiler.is_compiling():  # one autograd node (the soft phase's hot path)
            args = (self.k_groups, self.temperature, self.hardness, self.normalize)
            rows = weighted_candidate_rows(self.candidate_values(), self.alpha, self.candidate_ids(), *args)
            return rows, self.candidate_offsets()
        return self.candidate_values() * self.diagonal_weights()[:, None].to(self.V.dtype), self.candidate_offsets()

    def dense_weight(self) -> torch.Tensor:  # [out, in]
        if self.is_frozen:
            return super().dense_weight()
        values, offsets = self._candidate_values()
        return DF.place_diagonals(values, offsets, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.is_frozen:
            return super().forward(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CandidateDiagLinear: input last dimension {x.shape[-1]}, expected {self.in_features}")
        backend = get_backend(self.backend, x.device)
        fuse_perm = self.perm is not None and getattr(backend, "fuses_permutation", False)
        if self.perm is not None and not fuse_perm:  # the diagonals act on x[..., perm], as in DiagLinear.forward
            x = torch.gather(x, -1, self.perm.expand(*x.shape[:-1], -1))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        values, offsets = self._candidate_values()  # [K', D]
        x2d = x.reshape(-1, self.in_features).to(dtype)  # [N, in]
        bias = None if self.bias is None else self.bias.to(dtype)
        args = (x2d, values.to(dtype), offsets, bias, self.in_features, self.out_features)
        y = backend.diag_linear(*args, perm=self.perm) if fuse_perm else backend.diag_linear(*args)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _freeze_positions(self) -> torch.Tensor:  # [K] int64, ascending: positions in candidate_offsets()
        ids = self.candidate_ids()
        keep = torch.zeros_like(self.candidates)
        keep[ids[hard_top_k(self.alpha[ids], self.k_groups)]] = True
        keep_diagonals = DG.expand_group_weights(keep, self.num_diagonals, self.group)  # [P]
        return torch.nonzero(keep_diagonals[self.candidate_offsets()]).flatten()

    def freeze_rows(self) -> torch.Tensor:  # [K] int64, by ascending offset
        """Rows of ``V`` the freeze keeps: the diagonals of the hard top-``k_groups`` candidate units.

        :func:`~dynadiag.methods.dynadiag.freeze_all_` carries the optimizer state of these rows.
        """
        positions, rows = self._freeze_positions(), self._candidate_cache()[3]
        return positions if rows is None else rows[positions]

    @torch.no_grad()
    def freeze_(self, fold_soft_weights: bool = False):  # -> Self
        """Keep the ``k_groups`` candidate units with the largest ``alpha`` (the hard selection), with weight 1.

        ``V`` becomes a new ``[K, D]`` parameter (rows :meth:`freeze_rows`, the forward's hard set, ties included)
        and ``alpha`` an informational buffer, as :meth:`DiagLinear.freeze_` does.
        """
        if self.is_frozen:
            return self
        positions = self._freeze_positions()
        offsets = self.candidate_offsets()[positions]
        values = self.V.detach()[self.freeze_rows()].clone()
        if fold_soft_weights:
            values *= self.diagonal_weights().detach()[positions][:, None].to(values.dtype)
        alpha = self.alpha.detach().clone()
        del self.V, self.alpha
        self.V = nn.Parameter(values)  # [K, D]
        self.register_buffer("alpha", alpha)
        self.offsets = offsets
        self.k = int(offsets.numel())
        self.dropped_values = self.slots = None
        self._cache = None
        self.resolve_backend()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        values, slots = state_dict.get(prefix + "V"), state_dict.get(prefix + "slots")
        if prefix + "offsets" in state_dict:  # a frozen checkpoint: the base class adopts its layout
            self.dropped_values = self.slots = None
        elif not self.is_frozen and (
            (slots is None) != (self.slots is None) or (slots is not None and slots.shape != self.slots.shape)
        ):  # take the checkpoint's layout (stable or compact, its capacity)
            self.slots = None if slots is None else torch.empty_like(slots, device=self.candidates.device)
        if not self.is_frozen and values is not None and values.shape != self.V.shape:
            # a soft checkpoint stores its own candidate set's rows: take its storage size before the copy
            self.V = nn.Parameter(torch.empty(values.shape, device=self.V.device, dtype=self.V.dtype))
        if self.dropped_values is None and prefix + "dropped_values" in state_dict:
            self.dropped_values = torch.empty_like(state_dict[prefix + "dropped_values"], device=self.V.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
        self._cache = None
        if not self.is_frozen and self.slots is None:
            rows = self.candidate_offsets().numel()
            if self.V.shape[0] != rows and self.V.shape[0] == self.num_diagonals:
                # written before the candidate-only storage (all P rows): keep the candidates' rows
                self.V = nn.Parameter(self.V.detach()[self.candidate_offsets()].clone())
            elif self.V.shape[0] != rows:
                errors.append(f"{prefix}V: {self.V.shape[0]} rows for {rows} candidate diagonals")
        if not self.is_frozen and not self.alpha.requires_grad:
            self.alpha.requires_grad_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", candidates={int(self.candidates.sum())}"


def replace_with_candidates_(model: nn.Module) -> list[tuple[str, CandidateDiagLinear]]:
    """Swap every soft :class:`DiagLinear` of ``model`` for a :class:`CandidateDiagLinear`; return them by name."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is DiagLinear and not module.is_frozen:
            new = CandidateDiagLinear.from_diag_linear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            swapped.append((name, new))
    return swapped
