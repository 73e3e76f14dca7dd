"""``auto`` on CUDA: per layer, shape, token count and dtype, run each op on the diagonal kernel or a dense GEMM.

A frozen layer's three ops (forward, ``grad_x``, ``grad_V``) each have two implementations: the diagonal
kernels (``cuda`` backend; work ``2 K D N``) and dense GEMMs on the scattered weight (``dense`` backend; work
``2 in out N`` plus the scatter or gather). A small cost model, ``time = floor + flops / rate``, picks the faster
per op, so a layer is never slower than dense by the model's numbers. The choice depends on the dtype and on
torch's fp32 matmul precision: with TF32, bf16 or fp16 allowed, dense GEMMs run on tensor cores and win
everywhere the measured diagonal kernels stand today.

Rates (the prior): measured on an NVIDIA H200 at commit 50365c8 (docs/benchmarks/gpu/h200-quick-50365c8,
90 % sparsity, ViT-B shapes, 12,608 tokens): dense fp32 strict about 45 TFLOP/s, TF32 about 350, bf16 about
680; the v1 diagonal apply kernel about 6 TFLOP/s useful in the wide/square form and about 2 in the tall form
(measured before the tall-form fix), ``grad_V`` about 1.5; bf16 diagonal kernels ran at the fp32 time. These
are a prior, not a law: ``scripts/gpu_check.sh`` measures the rates on the machine it runs on and writes a
profile JSON that :func:`profile_for` loads instead (``$DYNADIAG_COST_PROFILE``, or
``<cache>/cost_profile/<gpu name>.json``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dynadiag.kernels._build import cache_root
from dynadiag.kernels.dense import DiagOps, Plan, diag_linear_mixed

__all__ = ["H200_PRIOR", "AutoBackend", "DeviceProfile", "OpCosts", "choose_plan", "profile_for"]


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs (useful TFLOP/s) and per-kernel floors (ms) the cost model uses for one kind of device.

    ``diag`` keys: ``apply_wide``, ``apply_tall`` (forward and ``grad_x``; tall when the op's output is strictly
    the longer side) and ``sddmm`` (``grad_V``), for fp32 (16-bit inputs run at the fp32 rate today); ``dense``
    keys: ``fp32`` (strict), ``tf32``, ``bf16``, ``fp16``, ``fp64``. ``bandwidth_gbs`` prices the scatter of the
    diagonals into ``W`` and the gather out of ``grad_W``.
    """

    name: str
    source: str
    diag: dict[str, float] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)
    diag_floor_ms: float = 0.02
    dense_floor_ms: float = 0.01
    bandwidth_gbs: float = 3000.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        return cls(**json.loads(text))


H200_PRIOR = DeviceProfile(
    name="NVIDIA H200 (prior)",
    source="docs/benchmarks/gpu/h200-quick-50365c8 (v1 kernels, 90 %, ViT-B shapes, 12,608 tokens)",
    diag={"apply_wide": 6.0, "apply_tall": 2.0, "sddmm": 1.5},
    dense={"fp32": 45.0, "tf32": 350.0, "bf16": 680.0, "fp16": 680.0, "fp64": 50.0},
)


@dataclass(frozen=True)
class OpCosts:
    """Modelled milliseconds of each op on each path, and the resulting plan."""

    plan: Plan
    diag_ms: tuple[float, float, float]  # fwd, dx, dv
    dense_ms: tuple[float, float, float]

    @property
    def speedup_vs_dense(self) -> float:
        """Modelled dense time over the plan's time (for the ops that run)."""
        chosen = sum(d if p == "diag" else n for p, d, n in zip(self.plan, self.diag_ms, self.dense_ms, strict=True))
        return sum(self.dense_ms) / max(chosen, 1e-12)


@torch.compiler.assume_constant_result  # torch.compile: read once at trace time (changing it later needs a recompile)
def _matmul_precision() -> str:
    return torch.get_float32_matmul_precision()


def _dense_key(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if _matmul_precision() != "highest" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype, "fp32")


def choose_plan(
    in_features: int,
    out_features: int,
    k: int,
    tokens: int,
    dtype: torch.dtype,
    training: bool,
    profile: DeviceProfile,
) -> OpCosts:
    """Per op, the faster of the diagonal kernel and the dense GEMM under ``profile``.

    Args:
        in_features, out_features: the layer's shape.
        k: kept diagonals.
        tokens: rows of the flattened input (``N``).
        dtype: activation dtype (fp32 follows ``torch.get_float32_matmul_precision()``: not "highest" = TF32).
        training: whether ``grad_x``/``grad_V`` will run (otherwise only the forward is compared).
        profile: the device's rates.

    Returns:
        The plan with the modelled times. fp64 (gradcheck) always takes the diagonal kernels.
    """
    length = min(in_features, out_features)
    useful = 2.0 * k * length * tokens / 1e9  # GFLOP of one diagonal op
    full = 2.0 * in_features * out_features * tokens / 1e9  # GFLOP of one dense GEMM
    # Square layers run at the wide rate (every diagonal reaches every output tile, nothing is skipped).
    d = profile.diag
    fwd_rate = d["apply_tall" if out_features > in_features else "apply_wide"]
    dx_rate = d["apply_tall" if in_features > out_features else "apply_wide"]  # grad_x: the transposed pattern
    diag_ms = tuple(profile.diag_floor_ms + useful / rate for rate in (fwd_rate, dx_rate, d["sddmm"]))
    rate = profile.dense[_dense_key(dtype)]
    # Scatter (zero fill + K*D writes) or gather of W: memory-bound, priced at the profile's bandwidth.
    weight_bytes = in_features * out_features * torch.empty((), dtype=dtype).element_size()
    touch_ms = profile.dense_floor_ms + weight_bytes / (profile.bandwidth_gbs * 1e6)
    gemm_ms = profile.dense_floor_ms + full / rate
    dense_ms = (gemm_ms + touch_ms, gemm_ms + touch_ms, gemm_ms + touch_ms)
    if dtype == torch.float64:
        return OpCosts(Plan("diag", "diag", "diag"), diag_ms, dense_ms)
    picks = [("diag" if dg <= dn else "dense") for dg, dn in zip(diag_ms, dense_ms, strict=True)]
    if not training:
        picks[1:] = [picks[0], picks[0]]  # not run; keep the label of the forward's choice
        diag_ms = (diag_ms[0], 0.0, 0.0)
        dense_ms = (dense_ms[0], 0.0, 0.0)
    return OpCosts(Plan(*picks), diag_ms, dense_ms)


def _profile_path(device_name: str) -> Path:
    return cache_root() / "cost_profile" / (re.sub(r"[^A-Za-z0-9._-]+", "_", device_name) + ".json")


def profile_for(device: torch.device) -> DeviceProfile:
    """The cost profile for ``device``: ``$DYNADIAG_COST_PROFILE``, a measured one in the cache, or the prior."""
    path = os.environ.get("DYNADIAG_COST_PROFILE")
    if path:
        return DeviceProfile.from_json(Path(path).read_text())
    if device.type == "cuda" and torch.cuda.is_available():
        cached = _profile_path(torch.cuda.get_device_name(device))
        if cached.exists():
            return DeviceProfile.from_json(cached.read_text())
    return H200_PRIOR


def save_profile(profile: DeviceProfile) -> Path:
    """Store a measured profile where :func:`profile_for` finds it for a device of that name."""
    path = _profile_path(profile.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
    return path


class AutoBackend:
    """``auto`` on CUDA: each op of each layer on the diagonal kernel or a dense GEMM, by :func:`choose_plan`.

    Args:
        diag_name: the diagonal-kernel backend's name (``"cuda"``; tests on CPU use ``"cpu"``).
        diag_ops: its three ops (the ``torch.ops.dynadiag`` ops dispatch on the tensors' device).
        profile: the device's cost profile.
    """

    name = "auto"

    def __init__(self, diag_name: str, diag_ops: DiagOps, profile: DeviceProfile) -> None:
        self.diag_name = diag_name
        self.diag_ops = diag_ops
        self.profile = profile
        self._plans: dict[tuple, OpCosts] = {}

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def plan(
        self, in_features: int, out_features: int, k: int, tokens: int, dtype: torch.dtype, training: bool
    ) -> OpCosts:
        """:func:`choose_plan` under this backend's profile (memoised in eager mode: a model has a few shapes)."""
        if torch.compiler.is_compiling():  # traced: plain arithmetic on the (possibly symbolic) token count
            return choose_plan(in_features, out_features, k, tokens, dtype, training, self.profile)
        key = (in_features, out_features, k, tokens, dtype, training, _matmul_precision())
        if key not in self._plans:
            self._plans[key] = choose_plan(in_features, out_features, k, tokens, dtype, training, self.profile)
        return self._plans[key]

    def kernel_name(
        self, in_features: int, out_features: int, k: int, tokens: int, dtype: torch.dtype, training: bool
    ) -> str:
        """What runs for this call, e.g. ``"cuda"``, ``"dense"`` or ``"fwd=cuda,dx=cuda,dv=dense"``."""
        return self.describe(self.plan(in_features, out_features, k, tokens, dtype, training).plan)

    def describe(self, plan: Plan) -> str:
        """Plan as backend names, e.g. ``"cuda"``, ``"dense"`` or ``"fwd=cuda,dx=cuda,dv=dense"``."""
        return str(Plan(*(self.diag_name if p == "diag" else "dense" for p in plan)))

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, strictly ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b``, each op on the path the cost model picks for this shape, token count and dtype."""
        from dynadiag.kernels import ops

        tokens = x.numel() // max(in_features, 1)
        training = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)
        plan = self.plan(in_features, out_features, offsets.numel(), tokens, x.dtype, training).plan
        dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

        def fwd(x2, v, off, out_f):
            return diag_linear_mixed(x2, v, off, out_f, plan, self.diag_ops)

        return ops.diag_linear("auto", None, dtypes, x, values, offsets, bias, in_features, out_features, fwd)
