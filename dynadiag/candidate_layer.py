"""``CandidateDiagLinear``: a soft-phase DiagLinear that computes with a candidate set of diagonals only.

The paper's soft phase weights all ``P`` diagonals, so it is a dense layer (scaled by ~``K/P``) until the freeze.
This layer keeps the full ``V`` (``[P, D]``) and ``alpha`` (``[P]``) storage but computes with a *candidate set* of
``K' >= K`` diagonals (a boolean buffer, changed by :class:`~dynadiag.methods.sparse_dynadiag.SparseDynaDiagMethod`)
through the same sparse kernels the frozen layer uses, with a per-diagonal weight folded into the values::

    V_eff = w[:, None] * V[candidates]          # [K', D]; autograd carries dL/dw to alpha and dL/dV_eff to V
    y = diag_linear(x, V_eff, candidates) + b

The weight of candidate ``p`` is a straight-through mix of a soft and a hard selection::

    soft_p = sigmoid((alpha_p - theta) / (T * sigma))   # theta: midway between the K-th and (K+1)-th alpha
    hard_p = 1 if p is among the K largest alpha else 0  # sigma: the std of the candidates' alpha (temperature
    w_p    = soft_p + h * (hard_p - soft_p).detach()     #        relative to the layer's own alpha spread)

so the selected diagonals weigh about 1 (no ``K/P`` shrink of the output), the temperature ``T`` is unitless, and
the hardness ``h`` ramps to 1 by the freeze: then ``w`` is exactly the top-``K`` indicator, the candidate set holds
``K`` diagonals, and :meth:`freeze_` (which keeps the top ``K`` candidates with weight 1) changes nothing.

``alpha`` is a buffer that requires grad, not an ``nn.Parameter``: the method trains it with its own optimizer
(own lr multiplier and weight decay) and the trainer's optimizer never sees it. Once frozen, the layer is an
ordinary frozen DiagLinear (``K`` rows, sparse kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag import functional as DF
from dynadiag.kernels import get_backend
from dynadiag.layers import DiagLinear

__all__ = ["CandidateDiagLinear", "candidate_weights", "hard_top_k"]


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


class CandidateDiagLinear(DiagLinear):
    """DiagLinear whose soft phase runs sparse on a candidate set (constructor as :class:`DiagLinear`).

    Extra state: ``candidates`` (bool buffer ``[P]``), ``temperature`` (unitless, relative to the alpha spread)
    and ``hardness`` (``h``). Build one from an existing layer with :meth:`from_diag_linear`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hardness = 0.0
        self.normalize = False  # see candidate_weights
        self.register_buffer("candidates", torch.ones(self.num_diagonals, dtype=torch.bool, device=self.V.device))
        self._ids: torch.Tensor | None = None  # cached sorted candidate ids
        # alpha is trained by the method's own optimizer: a grad-requiring buffer keeps it out of model.parameters()
        alpha = self.alpha.detach()
        del self.alpha
        self.register_buffer("alpha", alpha.requires_grad_())

    @classmethod
    def from_diag_linear(cls, layer: DiagLinear) -> CandidateDiagLinear:
        """A soft CandidateDiagLinear with ``layer``'s sizes, ``k``, values, alpha, bias and backend."""
        if layer.is_frozen:
            raise ValueError("CandidateDiagLinear.from_diag_linear needs a soft (unfrozen) DiagLinear")
        if getattr(layer, "group", 1) != 1 or getattr(layer, "perm", None) is not None:
            raise ValueError("CandidateDiagLinear supports ungrouped, unpermuted layers only (group=1, permute=False)")
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            sparsity=layer.sparsity,
            backend=layer.backend,
            device=layer.V.device,
            dtype=layer.V.dtype,
        )
        new.k, new.layer_name = layer.k, layer.layer_name
        with torch.no_grad():
            new.V.copy_(layer.V)
            new.alpha.copy_(layer.alpha)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    # ------------------------------------------------------------------ candidate set
    def candidate_ids(self) -> torch.Tensor:  # [K'] int64, ascending
        if self._ids is None or self._ids.device != self.candidates.device:
            self._ids = torch.nonzero(self.candidates).flatten()
        return self._ids

    @torch.no_grad()
    def set_candidates_(self, ids: torch.Tensor) -> None:
        """Make ``ids`` (``[K']``, ``K' >= k``) the candidate set."""
        mask = torch.zeros_like(self.candidates)
        mask[ids.to(mask.device)] = True
        if int(mask.sum()) < self.k:
            raise ValueError(f"{self.layer_name or 'CandidateDiagLinear'}: need >= {self.k} candidates, got {ids}")
        self.candidates.copy_(mask)
        self._ids = None

    @property
    def soft_nnz(self) -> int:
        """Weights the soft phase computes with: ``K' * D``."""
        return int(self.candidates.sum()) * self.diag_length

    def candidate_weights(self) -> torch.Tensor:  # [K']
        """Weights of the candidates (differentiable in ``alpha``)."""
        ids = self.candidate_ids()
        return candidate_weights(self.alpha[ids], self.k, self.temperature, self.hardness, self.normalize)

    # ------------------------------------------------------------------ selection_stats hooks
    def selection_weights(self) -> torch.Tensor:  # [P]
        weights = torch.zeros(self.num_diagonals, device=self.V.device)
        if self.is_frozen:
            weights[self.offsets] = 1.0
            return weights
        weights[self.candidate_ids()] = self.candidate_weights().detach().float()
        return weights

    def selection_scores(self) -> torch.Tensor:  # [P]
        scores = self.alpha.detach().float().clone()
        scores[~self.candidates] = -torch.inf
        return scores

    def selection_temperature(self) -> float:
        """The scale at which the soft weights see ``alpha``: ``T * std(alpha of the candidates)``."""
        alpha = self.alpha.detach()[self.candidate_ids()].float()
        return self.temperature * max(float(alpha.std(unbiased=False)), 1e-6)

    # ------------------------------------------------------------------ compute
    def dense_weight(self) -> torch.Tensor:  # [out, in]
        if self.is_frozen:
            return super().dense_weight()
        ids = self.candidate_ids()
        values = self.V[ids] * self.candidate_weights()[:, None].to(self.V.dtype)
        return DF.place_diagonals(values, ids, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.is_frozen:
            return super().forward(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CandidateDiagLinear: input last dimension {x.shape[-1]}, expected {self.in_features}")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ids = self.candidate_ids()
        values = self.V[ids] * self.candidate_weights()[:, None].to(self.V.dtype)  # [K', D]
        x2d = x.reshape(-1, self.in_features).to(dtype)  # [N, in]
        bias = None if self.bias is None else self.bias.to(dtype)
        backend = get_backend(self.backend, x.device)
        y = backend.diag_linear(x2d, values.to(dtype), ids, bias, self.in_features, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def freeze_(self, fold_soft_weights: bool = False):  # -> Self
        """Keep the ``k`` candidates with the largest ``alpha`` (the hard selection), with weight 1."""
        if self.is_frozen:
            return self
        ids = self.candidate_ids()
        keep = torch.zeros_like(self.alpha, dtype=torch.bool)
        keep[ids[hard_top_k(self.alpha[ids], self.k)]] = True
        alpha = self.alpha.detach().clone()
        # DiagLinear.freeze_ keeps topk(alpha): hand it the indicator of the hard set (exactly the forward's set,
        # ties included), then put the real logits back into the (now informational) alpha buffer.
        self.alpha.detach().copy_(keep.to(alpha.dtype))
        super().freeze_(fold_soft_weights)
        self.alpha.copy_(alpha)
        self._ids = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ids = None
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
