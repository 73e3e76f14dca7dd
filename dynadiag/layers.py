"""``DiagLinear``: a linear layer whose weight is a learned set of wrapped diagonals (DynaDiag).

Life cycle:

1. **Soft phase.** All ``P`` candidate diagonals carry a weight ``w = clamp(k * softmax(alpha / T), 0, 1)``;
   the layer materialises ``W = sum_p w_p * placement_p(V_p)`` and runs one dense GEMM (all ``P`` diagonals
   are live, so the work is dense anyway). The trainer anneals ``temperature`` from high to low.
2. **Freeze.** :meth:`DiagLinear.freeze_` keeps ``topk(alpha, k)`` with weight 1, stores only those ``k``
   rows of ``V`` (sorted by diagonal id) and stops training ``alpha``.
3. **Frozen phase.** Compute is sparse, through the kernel backend registry (:mod:`dynadiag.kernels`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dynadiag import functional as DF
from dynadiag import groups as DG
from dynadiag.kernels import get_backend

__all__ = ["DiagLinear", "DiagonalSparseMixin"]


def all_diagonals_weight(values: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Dense ``[out, in]`` weight from all ``P`` diagonals ``values`` (``[P, D]``), as one gather.

    With ``out >= in``, ``W[r, t] = values[(r - t) % P, t]``; the wide case is the transpose of the same
    gather. A gather (backward: scatter-add) is much cheaper than an index_put over ``P * D`` elements.
    """
    num_diag, length = values.shape[0], values.shape[1]
    rows = torch.arange(num_diag, device=values.device)
    cols = torch.arange(length, device=values.device)
    index = (rows[:, None] - cols[None, :]) % num_diag  # [P, D]
    gathered = values.gather(0, index)  # [P, D]
    return gathered if out_features >= in_features else gathered.t()


class DiagonalSparseMixin:
    """State shared by diagonal layers: ``V`` (``[P, D, ...]``), ``alpha`` (``[P]``, or ``[G]`` for groups), ``k``
    and ``offsets``.

    Grouped layers (``group > 1``, see :mod:`dynadiag.groups`) hold one logit per group of ``group`` consecutive
    offsets and select ``k_groups`` groups; ``k`` is then the number of diagonals those groups hold (an upper bound
    before the freeze when the short last group could be chosen, exact after it).
    """

    #: group size ``g``; 1 is the ungrouped method.
    group: int = 1

    @property
    def is_frozen(self) -> bool:
        return self.offsets is not None

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.k / self.num_diagonals

    def soft_weights(self) -> torch.Tensor:  # [P]
        """Current per-diagonal weights ``clamp(k * softmax(alpha / T), 0, 1)`` (ones on kept rows once frozen)."""
        if self.is_frozen:
            return torch.ones(self.k, device=self.V.device, dtype=self.V.dtype)
        if self.group == 1:
            return DF.soft_topk_weights(self.alpha, self.k, self.temperature)
        weights = DF.soft_topk_weights(self.alpha, self.k_groups, self.temperature)  # [G]
        return DG.expand_group_weights(weights, self.num_diagonals, self.group)

    @torch.no_grad()
    def freeze_(self, fold_soft_weights: bool = False):  # -> Self
        """Keep exactly the ``k`` diagonals with the largest ``alpha``, with weight 1, in compact storage.

        Replaces ``V`` by a new ``[k, D]`` parameter and turns ``alpha`` into a buffer: an optimizer holding
        the old tensors must be updated (:func:`dynadiag.optim.replace_parameter_` does that).

        Args:
            fold_soft_weights: multiply each kept diagonal by its current soft weight before the weight becomes
                1, so the kept diagonals compute exactly what they did just before the freeze (only the dropped
                diagonals' contribution changes). The paper's freeze (``False``) sets the weights to 1.
        """
        if self.is_frozen:
            return self
        if self.group == 1:
            keep = torch.topk(self.alpha.detach().float(), self.k).indices.sort().values  # [K] ascending
        else:
            kept_groups = torch.topk(self.alpha.detach().float(), self.k_groups).indices  # [Gk]
            keep = DG.group_offsets(kept_groups, self.num_diagonals, self.group)  # [K] ascending
        values = self.V.detach()[keep].clone()
        if fold_soft_weights:
            scale = self.soft_weights().detach()[keep]
            values *= scale.reshape(-1, *([1] * (values.dim() - 1)))
        alpha = self.alpha.detach().clone()
        del self.V, self.alpha
        self.V = nn.Parameter(values)  # [K, D]
        self.register_buffer("alpha", alpha)
        self.offsets = keep.to(torch.long)
        self.k = int(keep.numel())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        # A frozen checkpoint loads into a fresh (soft) layer: adopt the frozen layout first.
        offsets = state_dict.get(prefix + "offsets")
        perm = state_dict.get(prefix + "perm")
        if perm is not None and getattr(self, "perm", None) is None and hasattr(self, "set_permutation_"):
            self.set_permutation_(torch.empty_like(perm, device=self.V.device))  # filled by the load below
        if offsets is not None and not self.is_frozen:
            device, dtype, trailing = self.V.device, self.V.dtype, self.V.shape[1:]
            alpha_shape = self.alpha.shape  # [P], or [G] for a grouped layer
            del self.V, self.alpha
            self.V = nn.Parameter(torch.empty(offsets.numel(), *trailing, device=device, dtype=dtype))
            self.register_buffer("alpha", torch.empty(alpha_shape, device=device, dtype=dtype))
            self.offsets = torch.empty_like(offsets, device=device)
            self.k = offsets.numel()
        elif offsets is None and self.is_frozen and prefix + "V" in state_dict:
            errors.append(f"{prefix}: cannot load a soft-phase (unfrozen) state into a frozen DiagLinear")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)


class DiagLinear(DiagonalSparseMixin, nn.Module):
    """Diagonally sparse replacement for :class:`torch.nn.Linear`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        sparsity: target fraction of zero weights, in ``[0, 1)``; sets ``k`` (active diagonals).
        backend: kernel backend for the frozen phase (``"auto"``, ``"reference"``, ``"cpu"``, ...).
        group: select groups of ``group`` consecutive diagonal offsets instead of single diagonals
            (:mod:`dynadiag.groups`); ``alpha`` is then ``[G]`` and the freeze keeps ``k_groups = ceil(K / group)``
            whole groups. 1 is the paper's layer.
        permute: apply a fixed random permutation to the inputs (``y = W_diag x[perm] + b``), drawn from
            ``permute_seed``; stored in the ``perm`` buffer (and checkpoints). :func:`dynadiag.sparsify_` draws one
            per layer from the seed and the layer's name instead.
        permute_seed: seed of that permutation.
        device: parameter device.
        dtype: parameter dtype.

    Shapes:
        input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float,
        backend: str = "auto",
        group: int = 1,
        permute: bool = False,
        permute_seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"DiagLinear needs positive sizes, got in={in_features}, out={out_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.sparsity = DF.validate_sparsity(sparsity, where=f"DiagLinear({in_features}->{out_features}): ")
        self.num_diagonals, self.diag_length = DF.diag_dims(in_features, out_features)
        self.group = DG.validate_group(group, where=f"DiagLinear({in_features}->{out_features}): ")
        self.num_groups = DG.num_groups(self.num_diagonals, self.group)
        self.k_groups = DG.num_active_groups(in_features, out_features, self.sparsity, self.group)
        if self.group == 1:
            self.k = DF.num_active_diagonals(in_features, out_features, self.sparsity)
        else:  # upper bound until the freeze (exact unless the short last group is kept)
            self.k = DG.kept_diagonals(self.num_diagonals, self.group, self.k_groups)
        self.backend = backend
        self.temperature = 1.0
        #: module name inside the model, set by :func:`dynadiag.sparsify_`; used in error messages.
        self.layer_name = ""
        #: what computed the last frozen forward: a backend name, or ``auto``'s per-op plan (e.g. ``"cpu"``,
        #: ``"dense"``, ``"fwd=cuda,dx=cuda,dv=dense"``); ``""`` before the first frozen forward. Shown in the
        #: sparsify report and the run summary.
        self.kernel = ""
        #: ``auto``'s measured dense time over the chosen plan's time for that call (``None``: not measured).
        self.kernel_ratio: float | None = None
        self.V = nn.Parameter(torch.empty(self.num_diagonals, self.diag_length, **factory))  # [P, D]
        self.alpha = nn.Parameter(torch.empty(self.num_groups, **factory))  # [P] (g = 1) or [G]
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("offsets", None)  # [K] int64 once frozen
        self.register_buffer("perm", None)  # [in] int64 when the inputs are permuted
        if permute:
            self.set_permutation_(DG.input_permutation(in_features, permute_seed).to(self.V.device))
        self.reset_parameters()

    def set_permutation_(self, perm: torch.Tensor | None) -> None:
        """Use ``perm`` (``[in]`` int64, a permutation of the inputs) from now on; ``None`` removes it.

        The diagonal values are not moved: call it before training (or before ``from_linear`` copies weights).
        """
        if perm is not None:
            perm = perm.to(device=self.V.device, dtype=torch.long)
            if perm.shape != (self.in_features,):
                raise ValueError(f"permutation must have shape [{self.in_features}], got {tuple(perm.shape)}")
        self.perm = perm

    def selection_scores(self) -> torch.Tensor:  # [P]
        """Per-diagonal ranking for :mod:`dynadiag.selection_stats`: ``alpha``, each group's logit on its diagonals.

        The freeze keeps the ``k_groups`` groups with the largest ``alpha``, i.e. the ``k`` diagonals ranked first here.
        """
        return DG.expand_group_weights(self.alpha, self.num_diagonals, self.group)

    def reset_parameters(self) -> None:
        """Kaiming-uniform ``V`` (a=sqrt(5), fan-in ``D``), ``alpha = 1/P`` (``1/G`` for groups), zero bias."""
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        with torch.no_grad():
            self.alpha.fill_(1.0 / self.alpha.numel())
            if self.bias is not None:
                self.bias.zero_()

    @property
    def nnz(self) -> int:
        """Non-zero weights the layer computes with once frozen (``k * D``)."""
        return self.k * self.diag_length

    def dense_weight(self) -> torch.Tensor:  # [out, in]
        """The diagonal ``[out, in]`` matrix the layer currently computes with (differentiable).

        It acts on the permuted inputs ``x[..., perm]`` when the layer has a permutation; :meth:`to_linear` gives
        the matrix that acts on ``x`` itself.
        """
        if self.is_frozen:
            return DF.place_diagonals(self.V, self.offsets, self.in_features, self.out_features)
        scaled = self.V * self.soft_weights()[:, None]
        return all_diagonals_weight(scaled, self.in_features, self.out_features)

    @property
    def weight(self) -> torch.Tensor:  # [out, in]
        """The dense ``[out, in]`` matrix the layer computes, acting on ``x`` itself, like ``nn.Linear.weight``.

        For code that reads a replaced layer's weight (timm's EVA/BEiT/Swin-V2 attention calls
        ``F.linear(x, self.qkv.weight, qkv_bias)``; ``nn.MultiheadAttention`` reads ``out_proj.weight``):
        ``F.linear(x, layer.weight, layer.bias)`` equals ``layer(x)`` and gradients flow to ``V`` (and ``alpha``
        before the freeze). It is materialised on every access (dense memory and compute, so such models do not get
        the sparse kernels), it is not a parameter (``state_dict`` and optimizers see ``V``/``alpha``), and it is
        read-only: writing into it changes nothing, assigning raises.
        """
        weight = self.dense_weight()
        if self.perm is not None:  # W_diag acts on x[perm]: column j of W_diag belongs to input perm[j]
            weight = weight[:, torch.argsort(self.perm)]
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.shape[-1] != self.in_features:
            name = f" '{self.layer_name}'" if self.layer_name else ""
            raise ValueError(
                f"DiagLinear{name} ({self.in_features}->{self.out_features}): input last dimension is "
                f"{x.shape[-1]}, expected {self.in_features}"
            )
        backend = get_backend(self.backend, x.device) if self.is_frozen else None
        # Backends that fuse the input permutation into their staging copy get it as an argument (grouped_cpu).
        fuse_perm = self.perm is not None and getattr(backend, "fuses_permutation", False)
        if self.perm is not None and not fuse_perm:
            # The diagonal pattern applies to the permuted features. torch.gather along the last dimension is
            # several times faster on CPU than index_select there (measured: 10 vs 138 ms on [8, 197, 3072]).
            x = torch.gather(x, -1, self.perm.expand(*x.shape[:-1], -1))
        if not self.is_frozen:
            return F.linear(x, self.dense_weight(), self.bias)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2d = x.reshape(-1, self.in_features).to(dtype)  # [N, in]
        bias = None if self.bias is None else self.bias.to(dtype)
        # Backends that cast the values themselves (grouped_cpu: into its cached weight tiles) get V as stored.
        values = self.V if getattr(backend, "casts_values", False) else self.V.to(dtype)
        args = (x2d, values, self.offsets, bias, self.in_features, self.out_features)
        y = backend.diag_linear(*args, perm=self.perm) if fuse_perm else backend.diag_linear(*args)
        self._note_kernel(backend, x2d, dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _note_kernel(self, backend, x2d: torch.Tensor, dtype: torch.dtype) -> None:
        """Record what computed this call (``kernel``) and, for ``auto``, its measured speed-up over dense."""
        kernel_name = getattr(backend, "kernel_name", None)
        if kernel_name is None:
            self.kernel, self.kernel_ratio = backend.name, None
            return
        training = torch.is_grad_enabled() and (x2d.requires_grad or self.V.requires_grad)
        problem = (self.in_features, self.out_features, self.k, x2d.shape[0], dtype, training)
        self.kernel = kernel_name(*problem)
        ratio = getattr(backend, "kernel_ratio", None)
        self.kernel_ratio = None if ratio is None else ratio(*problem)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparsity: float,
        *,
        backend: str = "auto",
        scores: torch.Tensor | None = None,
        freeze: bool = False,
        group: int = 1,
        perm: torch.Tensor | None = None,
    ) -> DiagLinear:
        """Build a DiagLinear holding a dense layer's diagonals.

        Args:
            linear: the dense layer; its weight is read, not modified.
            sparsity: target sparsity of the new layer.
            backend: kernel backend for the frozen phase.
            scores: per-diagonal importance ``[P]`` (or per-group ``[G]``) used as ``alpha``; default: each
                diagonal's L2 norm (each group's L2 norm for ``group > 1``).
            freeze: keep only the top-``k`` diagonals (groups) right away.
            group: group size of the new layer.
            perm: input permutation ``[in]`` of the new layer; the diagonals are read from ``W[:, perm]`` so the
                layer still computes ``x W^T`` (exactly at sparsity 0).
        """
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            sparsity=sparsity,
            backend=backend,
            group=group,
            device=weight.device,
            dtype=weight.dtype,
        )
        if perm is not None:
            layer.set_permutation_(perm)
            weight = weight[:, layer.perm]  # y = W x = W[:, perm] x[perm]
        with torch.no_grad():
            layer.V.copy_(DF.gather_diagonals(weight))
            if scores is None:
                alpha = DG.group_scores(layer.V.norm(dim=1), layer.group)
            else:
                alpha = scores.to(layer.alpha)
                if alpha.numel() == layer.num_diagonals and layer.group > 1:
                    alpha = DG.group_scores(alpha, layer.group, reduce="sum")
            layer.alpha.copy_(alpha.reshape(layer.num_groups))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer.freeze_() if freeze else layer

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The exact dense equivalent of what the layer computes now."""
        weight = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def freeze_(self, fold_soft_weights: bool = False):  # -> Self
        super().freeze_(fold_soft_weights)
        self.resolve_backend()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.is_frozen:
            self.resolve_backend()

    def resolve_backend(self) -> None:
        """Import (and build, if needed) the frozen layer's backend now, outside ``forward``.

        ``forward`` looks the backend up by name; doing the first, importing lookup here keeps that lookup a plain
        cache hit, so ``torch.compile`` traces a frozen model without a graph break even on its first call.
        Errors are left for ``forward`` to raise, where the user sees them in context. A backend with a
        ``prepare(offsets, in_features, out_features)`` builds its per-layer plan here, once, at the freeze.
        """
        with contextlib.suppress(ValueError):
            backend = get_backend(self.backend, self.V.device)
            prepare = getattr(backend, "prepare", None)
            if prepare is not None and self.is_frozen:
                prepare(self.offsets, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"k={self.k}/{self.num_diagonals}, sparsity={self.achieved_sparsity:.4f}, frozen={self.is_frozen}, "
            f"backend={self.backend}"
            + (f", group={self.group} (k_groups={self.k_groups}/{self.num_groups})" if self.group > 1 else "")
            + (", permuted" if self.perm is not None else "")
        )
