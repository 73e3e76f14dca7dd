"""Measured kernel choice for ``auto``: time the candidates once per problem, keep the winner on disk.

Like cuDNN's benchmark mode or Triton's autotuner: the first call of a frozen (or candidate-set) diagonal layer with
a new :class:`TuneKey` (phase, layer shape, kept diagonals, token bucket, dtype, thread count, device, ISA) times
every candidate of each op (forward, ``grad_x``, ``grad_V``) on tensors of the call's shape: the diagonal kernels
(``cpu``, ``grouped_cpu`` where the offsets form runs, ``cuda``) and dense GEMMs priced as ``nn.Linear`` (plus the
scatter of ``W`` while the values train). The fastest plan wins only if it beats dense by :data:`MARGIN`, so a kernel
measured slower than dense never runs; fp64 (``gradcheck``) always takes the diagonal kernels.

Choices are kept in memory and in one JSON file per device under the project's cache
(``<cache>/autotune/<device>.json``, see :func:`dynadiag.kernels._build.cache_root`; ``$DYNADIAG_AUTOTUNE_CACHE``
names another folder), so later processes reuse them.
A corrupt or foreign file is ignored with one warning and rewritten. The switch: ``DYNADIAG_AUTOTUNE=0`` (or
:func:`set_enabled`, the run config's ``autotune: false``) replaces the measurement by a deterministic rule.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dynadiag.kernels._build import cache_root
from dynadiag.kernels.dense import DiagOps, Plan, gather_weight, scatter_weight

__all__ = [
    "MARGIN",
    "Choice",
    "TuneKey",
    "cache_path",
    "clear_memory",
    "enabled",
    "measure",
    "set_enabled",
    "token_bucket",
]

#: a non-dense plan must be at least this much faster than dense (timing noise must not pick a slower kernel)
MARGIN = 0.02
#: timing budget per op and candidate (ms); every candidate runs at least twice after one warm-up run
BUDGET_MS = float(os.environ.get("DYNADIAG_AUTOTUNE_MS", "5"))
FORMAT = 1
_ENABLED: bool | None = None
_LOCK = threading.Lock()
_MEMORY: dict[str, dict[str, Choice]] = {}  # file name -> key -> choice
_WARNED: set[str] = set()


def enabled() -> bool:
    """Whether ``auto`` measures (default), or follows its deterministic rule (``DYNADIAG_AUTOTUNE=0``)."""
    if _ENABLED is not None:
        return _ENABLED
    value = os.environ.get("DYNADIAG_AUTOTUNE", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"DYNADIAG_AUTOTUNE must be 1 or 0, got {value!r}")
    return value in ("1", "true", "on", "yes")


def set_enabled(value: bool | None) -> None:
    """Turn the measurement on or off for this process; ``None`` goes back to ``$DYNADIAG_AUTOTUNE``."""
    global _ENABLED
    _ENABLED = None if value is None else bool(value)


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: calls within a factor of two share one measurement."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


@dataclass(frozen=True)
class TuneKey:
    """What a measurement is valid for. ``phase``: ``"infer"`` (forward only) or ``"train"`` (all three ops);
    ``runs``: the offsets' mean run length as a power of two (grouped layers' band tiles depend on it)."""

    phase: str
    in_features: int
    out_features: int
    k: int
    tokens: int  # the bucket (token_bucket)
    dtype: str
    threads: int
    device: str
    isa: str
    runs: int = 1

    def __str__(self) -> str:
        return (
            f"{self.phase}|{self.in_features}x{self.out_features}|k{self.k}|n{self.tokens}|{self.dtype}"
            f"|t{self.threads}|{self.isa}|g{self.runs}"
        )


@dataclass(frozen=True)
class Choice:
    """A plan, its time relative to dense (``ratio`` = dense ms / plan ms, > 1 faster) and where it came from
    (``"measured"``, ``"cache"`` or ``"rule"``; ``ratio`` is ``None`` for a rule)."""

    plan: Plan
    ratio: float | None
    source: str
    ms: dict[str, float] | None = None

    def to_json(self) -> dict:
        return {"plan": str(self.plan), "ratio": self.ratio, "ms": self.ms}

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        ratio = data.get("ratio")
        return cls(Plan.parse(str(data["plan"])), None if ratio is None else float(ratio), "cache", data.get("ms"))


# ---------------------------------------------------------------------------------------------------- the cache
def cache_path(device: str) -> Path:
    """The choices file of one device (``device``: e.g. the CPU model or GPU name)."""
    folder = Path(os.environ["DYNADIAG_AUTOTUNE_CACHE"]) if os.environ.get("DYNADIAG_AUTOTUNE_CACHE") else None
    folder = folder or cache_root() / "autotune"
    return folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") + ".json")


def _read(path: Path) -> dict[str, Choice]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return {key: Choice.from_json(value) for key, value in data["choices"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            warnings.warn(
                f"dynadiag: ignoring the unreadable autotune cache {path} ({type(exc).__name__}: {exc}); it will be "
                "rewritten (delete it to silence this, or set DYNADIAG_AUTOTUNE=0)",
                stacklevel=3,
            )
        return {}


def _write(path: Path, choices: Mapping[str, Choice]) -> None:
    """Merge ``choices`` into the file (other processes may have added theirs) and replace it atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **choices}
        data = {"format": FORMAT, "choices": {k: v.to_json() for k, v in sorted(merged.items())}}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a re-measurement per process, nothing else
        if str(path) + "w" not in _WARNED:
            _WARNED.add(str(path) + "w")
            warnings.warn(f"dynadiag: cannot write the autotune cache {path}: {exc}", stacklevel=3)


def lookup(key: TuneKey) -> Choice | None:
    """The stored choice for ``key`` (memory, then the device's file), or ``None``."""
    name = str(cache_path(key.device))
    with _LOCK:
        if name not in _MEMORY:
            _MEMORY[name] = _read(Path(name))
        return _MEMORY[name].get(str(key))


def store(key: TuneKey, choice: Choice) -> None:
    """Keep ``choice`` for ``key`` in memory and on disk."""
    name = str(cache_path(key.device))
    with _LOCK:
        _MEMORY.setdefault(name, {})[str(key)] = choice
        _write(Path(name), {str(key): choice})


def clear_memory() -> None:
    """Forget the in-memory choices (the files stay); the next lookup reads the files again."""
    with _LOCK:
        _MEMORY.clear()
        _WARNED.clear()


# ---------------------------------------------------------------------------------------------------- timing
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call: the calling thread's CPU time when the CPU ops run single-threaded (a loaded
    machine preempts long runs more often than short ones, which skews wall-clock ratios), else the wall clock
    (with a device synchronisation on CUDA)."""
    cpu_single = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_single else time.perf_counter

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (clock() - start) * 1e3

    return run


def _time_all(fns: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Minimum ms of each function: one warm-up, then interleaved rounds until each has used its budget (>= 2)."""
    run = _timer(device)
    warm = {name: run(fn) for name, fn in fns.items()}
    reps = {name: max(2, min(20, math.ceil(BUDGET_MS / max(ms, 1e-3)))) for name, ms in warm.items()}
    best = dict.fromkeys(fns, math.inf)
    for rep in range(max(reps.values())):
        for name, fn in fns.items():
            if rep < reps[name]:
                best[name] = min(best[name], run(fn))
    return best


def measure(
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K]
    in_features: int,
    out_features: int,
    tokens: int,
    training: bool,
    candidates: Mapping[str, DiagOps],
    bias: bool = True,
) -> Choice:
    """Time dense and every candidate's ops on random activations of ``tokens`` rows; pick the fastest plan.

    Args:
        values, offsets: the layer's diagonals (values in the activation dtype).
        in_features, out_features: the layer's shape.
        tokens: rows of the timed activations.
        training: time ``grad_x`` and ``grad_V`` too (the values train); otherwise the forward only, with the dense
            ``W`` already materialised (cached for untrained values: :func:`dynadiag.kernels.dense.cached_weight`).
        candidates: diagonal-kernel ops by name.
        bias: whether the layer has a bias (fused into the GEMM / the kernel, as the real call does).
    """
    device, dtype = values.device, values.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, generator=gen)
    grad_y = torch.randn(tokens, out_features, device=device, dtype=dtype, generator=gen)
    b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
    values, offsets = values.detach().contiguous(), offsets.contiguous()
    weight = scatter_weight(values, offsets, in_features, out_features)
    fns: dict[str, Callable[[], object]] = {"dense.fwd": lambda: torch.nn.functional.linear(x, weight, b)}
    for name, ops in candidates.items():
        if b is not None and ops.fwd_bias is not None:
            fns[f"{name}.fwd"] = lambda o=ops: o.fwd_bias(x, values, offsets, out_features, b)
        else:
            fns[f"{name}.fwd"] = lambda o=ops: o.fwd(x, values, offsets, out_features)
    if training:
        fns["dense.scatter"] = lambda: scatter_weight(values, offsets, in_features, out_features)
        fns["dense.dx"] = lambda: grad_y @ weight
        fns["dense.dv"] = lambda: gather_weight(grad_y.t() @ x, offsets)
        for name, ops in candidates.items():
            fns[f"{name}.dx"] = lambda o=ops: o.bwd_x(grad_y, values, offsets, in_features)
            fns[f"{name}.dv"] = lambda o=ops: o.bwd_v(grad_y, x, offsets)
    with torch.no_grad():
        ms = _time_all(fns, device)
    return _pick(ms, list(candidates), training)


def _pick(ms: Mapping[str, float], names: list[str], training: bool) -> Choice:
    """The fastest plan from measured op times; all-dense unless another plan beats it by :data:`MARGIN`."""
    paths = ["dense", *names]
    if not training:
        dense = ms["dense.fwd"]
        best = min(paths, key=lambda p: ms[f"{p}.fwd"])
        plan = Plan(best, best, best) if ms[f"{best}.fwd"] < dense * (1 - MARGIN) else Plan()
        return Choice(plan, dense / ms[f"{plan.fwd}.fwd"], "measured", dict(ms))

    def total(plan: Plan) -> float:
        scatter = ms["dense.scatter"] if "dense" in (plan.fwd, plan.dx) else 0.0
        return scatter + ms[f"{plan.fwd}.fwd"] + ms[f"{plan.dx}.dx"] + ms[f"{plan.dv}.dv"]

    plans = [Plan(f, x, v) for f in paths for x in paths for v in paths]
    best = min(plans, key=total)
    dense = total(Plan())
    plan = best if total(best) < dense * (1 - MARGIN) else Plan()
    return Choice(plan, dense / total(plan), "measured", dict(ms))
