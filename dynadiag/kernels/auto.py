"""The ``auto`` backend: per layer, phase, token count and dtype, each op on the path measured fastest here.

For every call :class:`AutoBackend` looks up a :class:`~dynadiag.kernels.autotune.Choice` (measured once per
:class:`~dynadiag.kernels.autotune.TuneKey` and kept on disk; see :mod:`dynadiag.kernels.autotune`) and runs the
forward, ``grad_x`` and ``grad_V`` on the paths it names through
:func:`~dynadiag.kernels.dense.diag_linear_mixed`. Dense GEMMs are always a candidate, so a kernel measured slower
than dense never runs. With the measurement switched off (``DYNADIAG_AUTOTUNE=0``) a deterministic rule decides:
on CPU the diagonal kernels when the CPU runs a vectorised variant of them and at most a quarter of the diagonals
are kept (the measured break-even is ~75 % sparsity), dense otherwise; on CUDA the cost model
(:mod:`dynadiag.kernels.costmodel`).

Candidates: ``cpu`` (the variant :func:`dynadiag.kernels.cpu.isa` runs) on CPU, ``cuda`` on CUDA; the band-tile
kernels (``grouped_cpu``; ``grouped_triton`` and ``bsr_triton`` on CUDA) join where the offsets form runs of at least
:data:`GROUPED_MIN_RUN` consecutive ids (grouped layers), the only layers they can win on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import weakref
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from dynadiag.kernels import Backend, autotune, get_backend, ops
from dynadiag.kernels.autotune import Choice, TuneKey
from dynadiag.kernels.dense import BACKEND as DENSE
from dynadiag.kernels.dense import DiagOps, Plan, diag_linear_mixed, frozen_weight

__all__ = ["AutoBackend", "cpu_isa", "device_name", "for_device", "mean_run"]

Rule = Callable[[int, int, int, int, torch.dtype, bool, tuple[str, ...]], Plan]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: band-tile kernels (grouped layers) are timed only for offsets whose runs of consecutive ids are at least this long
GROUPED_MIN_RUN = 4
_RUN_KERNELS = ("grouped_cpu", "grouped_triton", "bsr_triton")


# caps on the dense side's instruction set (how an AVX2-only CPU is emulated on an AVX-512 one)
_CAPS = (("onednn", "ONEDNN_MAX_CPU_ISA"), ("mkl", "MKL_ENABLE_INSTRUCTIONS"))


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The device's model (CPU model name, GPU name): one autotune file per model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() if device.type == "cpu" else device.type


def cpu_isa() -> str:
    """The CPU kernels' instruction-set variant (``dynadiag.kernels.cpu.isa()`` where it exists, else what torch
    reports), plus any cap on oneDNN/MKL's own (the dense side), e.g. ``"avx512"`` or ``"avx512+onednn=AVX2"``."""
    from dynadiag.kernels import cpu

    try:
        name = cpu.isa()
    except Exception:  # no CPU library (build failed) or a refused DYNADIAG_CPU_ISA: what torch reports
        name = torch.backends.cpu.get_cpu_capability().lower()
    caps = [f"{k}={os.environ[v]}" for k, v in _CAPS if os.environ.get(v)]
    return "+".join([str(name), *caps])


def _cuda_isa(device: torch.device) -> str:
    from dynadiag.kernels import cuda_v2

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}-{cuda_v2.kernel_version()}"


def mean_run(offsets: torch.Tensor) -> int:
    """Mean length of the runs of consecutive offsets, rounded to a power of two (1 for free diagonals)."""
    host = offsets.detach().cpu()
    if host.numel() == 0:
        return 1
    runs = 1 + int((host[1:] != host[:-1] + 1).sum())
    return autotune.token_bucket(round(host.numel() / runs))


def _dtype_name(dtype: torch.dtype, device: torch.device) -> str:
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        name += "-tf32"  # dense fp32 runs on tensor cores: a different race
    return name


class AutoBackend:
    """``auto``: each op of each layer on the diagonal kernel or a dense GEMM, whichever measured faster here.

    Args:
        device: the device it serves.
        candidates: diagonal-kernel ops by name (e.g. ``{"cpu": ..., "grouped_cpu": ...}``); may be empty.
        rule: the deterministic choice with the measurement off: ``(in, out, k, tokens, dtype, training, names)``
            -> plan.
        isa: the kernel variant (part of the key).
    """

    name = "auto"
    #: DiagLinear passes ``V`` as stored: the dense path caches its ``W`` on it for untrained values.
    casts_values = True

    def __init__(self, device: torch.device, candidates: Mapping[str, DiagOps], rule: Rule, isa: str) -> None:
        self.device = device
        self.candidates = dict(candidates)
        # whole backends by name, for plans that run every op on one path (the common case)
        self.backends: dict[str, Backend] = {"dense": DENSE}
        for name in self.candidates:
            with contextlib.suppress(ImportError, ValueError):
                self.backends[name] = get_backend(name, device)
        self.rule = rule
        self.isa = isa
        self.device_name = device_name(device)
        # fast path: (id(offsets), ...) -> (weak ref to offsets, choice)
        self._memo: dict[tuple, tuple[weakref.ref, Choice]] = {}
        # (in, out, k, token bucket, dtype, training) -> choice: what kernel_name reports
        self._last: dict[tuple, Choice] = {}

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    # ------------------------------------------------------------------ choice
    def choose(
        self,
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K]
        in_features: int,
        out_features: int,
        tokens: int,
        dtype: torch.dtype,
        training: bool,
        bias: bool = True,
    ) -> Choice:
        """The plan for this call: remembered, read from the cache file, measured now, or the rule's."""
        if torch.compiler.is_compiling():  # traced (token counts may be symbolic): the deterministic rule
            return self._traced(in_features, out_features, offsets.numel(), tokens, dtype, training)
        bucket = autotune.token_bucket(tokens)
        on = autotune.enabled()
        fast = (id(offsets), offsets._version, offsets.numel(), in_features, out_features, bucket, dtype, training)
        fast += (torch.get_num_threads(), on, bias)
        hit = self._memo.get(fast)
        if hit is not None and hit[0]() is offsets:
            return hit[1]
        choice = self._choose(values, offsets, in_features, out_features, tokens, dtype, training, bias, on)
        self._memo[fast] = (weakref.ref(offsets, lambda _, k=fast: self._memo.pop(k, None)), choice)
        self._last[(in_features, out_features, offsets.numel(), bucket, dtype, training)] = choice
        return choice

    def _choose(self, values, offsets, in_features, out_features, tokens, dtype, training, bias, on) -> Choice:
        k = offsets.numel()
        names = self._names(offsets)
        if dtype == torch.float64 or not names:  # gradcheck runs the real kernels; nothing to race without any
            path = names[0] if names else "dense"
            return Choice(Plan(path, path, path), None, "rule")
        if not on:
            return Choice(self.rule(in_features, out_features, k, tokens, dtype, training, names), None, "rule")
        key = TuneKey(
            "train" if training else "infer",
            in_features,
            out_features,
            k,
            autotune.token_bucket(tokens),
            _dtype_name(dtype, self.device),
            torch.get_num_threads(),
            self.device_name,
            self.isa,
            mean_run(offsets),
        )
        choice = autotune.lookup(key)
        if choice is None or any(p != "dense" and p not in names for p in choice.plan):
            cands = {n: self.candidates[n] for n in names}
            choice = autotune.measure(values.detach().to(dtype), offsets, in_features, out_features, tokens, training,
                                      cands, bias)  # fmt: skip
            autotune.store(key, choice)
        return choice

    def _traced(
        self, in_features: int, out_features: int, k: int, tokens, dtype: torch.dtype, training: bool
    ) -> Choice:
        names = tuple(n for n in self.candidates if n not in _RUN_KERNELS)  # run lengths need the offsets' values
        if dtype == torch.float64 or not names:
            path = names[0] if names else "dense"
            return Choice(Plan(path, path, path), None, "rule")
        return Choice(self.rule(in_features, out_features, k, tokens, dtype, training, names), None, "rule")

    def _names(self, offsets: torch.Tensor) -> tuple[str, ...]:
        names = tuple(self.candidates)
        if any(n in _RUN_KERNELS for n in names) and mean_run(offsets) < GROUPED_MIN_RUN:
            names = tuple(n for n in names if n not in _RUN_KERNELS)
        return names

    def kernel_name(
        self, in_features: int, out_features: int, k: int, tokens: int, dtype: torch.dtype, training: bool
    ) -> str:
        """What ran for such a call, e.g. ``"cpu"``, ``"dense"`` or ``"fwd=cpu,dx=cpu,dv=dense"``."""
        if torch.compiler.is_compiling():
            return str(self._traced(in_features, out_features, k, tokens, dtype, training).plan)
        choice = self._last.get((in_features, out_features, k, autotune.token_bucket(tokens), dtype, training))
        return "" if choice is None else str(choice.plan)

    def kernel_ratio(
        self, in_features: int, out_features: int, k: int, tokens: int, dtype: torch.dtype, training: bool
    ) -> float | None:
        """Measured dense time over the chosen plan's time for such a call (``None`` when a rule chose)."""
        if torch.compiler.is_compiling():
            return None
        choice = self._last.get((in_features, out_features, k, autotune.token_bucket(tokens), dtype, training))
        return None if choice is None else choice.ratio

    # ------------------------------------------------------------------ compute
    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D] as stored (cast to x's dtype here)
        offsets: torch.Tensor,  # [K] int64, strictly ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b``, each op on the path chosen for this layer, token count, dtype and phase."""
        master = values
        tokens = x.numel() // max(in_features, 1)
        training = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)
        plan = self.choose(values, offsets, in_features, out_features, tokens, x.dtype, training, bias is not None)
        plan = plan.plan
        if plan.fwd == "dense" and x.dtype in _DTYPES and not torch.compiler.is_compiling():
            weight = frozen_weight(values, offsets, in_features, out_features, x.dtype)
            if weight is not None:  # values not trained: exactly nn.Linear's call on the cached W
                ops.check_offsets(offsets, max(in_features, out_features), "auto")
                return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        whole = self.backends.get(plan.fwd) if plan.fwd == plan.dx == plan.dv else None
        if whole is not None:  # one backend for every op: its own path (no per-op dispatch to pay for)
            return whole.diag_linear(x, values, offsets, bias, in_features, out_features)

        def fwd(x2, v, off, out_f):
            need_w = plan.fwd == "dense" or (training and plan.dx == "dense")
            weight = frozen_weight(master, off, in_features, out_f, x2.dtype) if need_w else None
            b = None if bias is None else bias.to(x2.dtype)
            return diag_linear_mixed(x2, v, off, out_f, plan, self.candidates, bias=b, weight=weight)

        return ops.diag_linear("auto", None, _DTYPES, x, values, offsets, None, in_features, out_features, fwd)


# ---------------------------------------------------------------------------------------------------- per device
def _cpu_rule(isa: str) -> Rule:
    """The diagonal kernels when they run vectorised here and at most a quarter of the diagonals are kept."""
    vectorised = isa.split("+")[0] not in ("scalar", "default", "")

    def rule(in_f: int, out_f: int, k: int, tokens: int, dtype: torch.dtype, training: bool, names) -> Plan:
        if "cpu" in names and vectorised and dtype in (torch.float32, torch.bfloat16) and 4 * k <= max(in_f, out_f):
            return Plan("cpu", "cpu", "cpu")
        return Plan()

    return rule


def _cpu_candidates() -> dict[str, DiagOps]:
    from dynadiag.kernels import get_backend_status

    found: dict[str, DiagOps] = {}
    if get_backend_status("cpu", torch.device("cpu"))[0]:
        dd = torch.ops.dynadiag
        found["cpu"] = DiagOps(dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v, dd.diag_fwd_bias)
    if get_backend_status("grouped_cpu", torch.device("cpu"))[0]:
        from dynadiag.kernels import grouped_cpu as g

        found["grouped_cpu"] = DiagOps(
            lambda x, v, off, out: g.grouped_apply(x, v, off, out, out >= x.shape[1]),
            lambda gy, v, off, in_f: g.grouped_apply(gy, v, off, in_f, not gy.shape[1] >= in_f),
            lambda gy, x, off: (
                g.grouped_sddmm(x, gy, off) if gy.shape[1] >= x.shape[1] else g.grouped_sddmm(gy, x, off)
            ),
            lambda x, v, off, out, b: g.grouped_apply(x, v, off, out, out >= x.shape[1], bias=b),
        )
    return found


def _cuda_rule(device: torch.device) -> Rule:
    from dynadiag.kernels.costmodel import choose_plan, profile_for

    profile = profile_for(device)

    def rule(in_f, out_f, k, tokens, dtype, training, names) -> Plan:
        plan = choose_plan(in_f, out_f, k, tokens, dtype, training, profile).plan
        return Plan(*("cuda" if p == "diag" else "dense" for p in plan))

    return rule


def for_device(device: torch.device) -> AutoBackend:
    """Build ``auto`` for ``device``: its diagonal kernels as candidates, its rule for the switched-off case."""
    if device.type == "cuda":
        from dynadiag.kernels import cuda, get_backend_status

        candidates = {"cuda": cuda.diag_ops()} if get_backend_status("cuda", device)[0] else {}
        for name in ("grouped_triton", "bsr_triton"):  # band tiles: raced on grouped layers only (runs of offsets)
            if get_backend_status(name, device)[0]:
                candidates[name] = importlib.import_module(f"dynadiag.kernels.{name}").DIAG_OPS
        return AutoBackend(device, candidates, _cuda_rule(device), _cuda_isa(device))
    if device.type == "cpu":
        isa = cpu_isa()
        return AutoBackend(device, _cpu_candidates(), _cpu_rule(isa), isa)
    return AutoBackend(device, {}, lambda *args: Plan(), device.type)
