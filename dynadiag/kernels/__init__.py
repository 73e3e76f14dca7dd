"""Kernel backends for frozen :class:`~dynadiag.DiagLinear` layers.

A backend computes ``y = x W^T + b`` for a frozen layer that keeps ``K`` wrapped diagonals. Backends are
looked up by name in a registry and imported lazily, so a missing compiler or GPU only matters to the
backend that needs it. ``reference`` (pure PyTorch) is the ground truth every other backend is tested
against; ``auto`` (:mod:`dynadiag.kernels.auto`) runs each op of each layer on the diagonal kernel or a dense GEMM,
whichever it measured faster on this machine for that shape, token count, dtype and phase (cached on disk,
:mod:`dynadiag.kernels.autotune`), so it is never slower than dense.

Every backend module exposes a module-level ``BACKEND`` object implementing :class:`Backend`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Protocol

import torch

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "get_backend_status",
    "register_backend",
]


class BackendUnavailableError(ValueError):
    """An explicitly requested backend is unknown or cannot run here."""


class Backend(Protocol):
    """What a kernel backend provides."""

    name: str

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        """Whether the backend can run on ``device`` (building or importing it if needed), and why not."""
        ...

    def diag_linear(
        self,
        x: torch.Tensor,  # [N, in_features]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, sorted ascending
        bias: torch.Tensor | None,  # [out_features]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [N, out_features]
        """Frozen diagonal linear layer; differentiable with respect to ``x``, ``values`` and ``bias``."""
        ...


# name -> (module path, priority for "auto"; higher wins)
_REGISTRY: dict[str, tuple[str, int]] = {
    "reference": ("dynadiag.kernels.reference", 0),
    "cpu": ("dynadiag.kernels.cpu", 20),
    "triton": ("dynadiag.kernels.triton", 10),
    "cuda": ("dynadiag.kernels.cuda", 30),
    # Dense GEMMs on the scattered weight, priced as nn.Linear: never chosen by priority (-1); ``auto`` mixes it in
    # per op where it measures faster (dynadiag.kernels.auto).
    "dense": ("dynadiag.kernels.dense", -1),
    # Band-tile kernels for grouped layers (dynadiag.groups); below "reference" in priority; "auto" times them only
    # for offsets that form runs (grouped layers), where they can win.
    "grouped_cpu": ("dynadiag.kernels.grouped_cpu", -1),
    "grouped_triton": ("dynadiag.kernels.grouped_triton", -1),
    "bsr_triton": ("dynadiag.kernels.bsr_triton", -1),  # torch's BSR Triton matmul: a candidate for measured auto
}
_LOADED: dict[str, Backend] = {}
_AVAILABILITY: dict[tuple[str, str], tuple[bool, str]] = {}
_WARNED: set[str] = set()
_AUTO: dict[str, Backend] = {}


def register_backend(name: str, module: str, priority: int = 5) -> None:
    """Register a backend implemented by ``module`` (which must define ``BACKEND``)."""
    _REGISTRY[name] = (module, priority)


def backend_names() -> list[str]:
    """All registered backend names (available or not), plus ``auto``."""
    return ["auto", *_REGISTRY]


def _load(name: str) -> Backend:
    if name not in _LOADED:
        module = importlib.import_module(_REGISTRY[name][0])
        _LOADED[name] = module.BACKEND
    return _LOADED[name]


def _check(name: str, device: torch.device) -> tuple[bool, str]:
    key = (name, device.type)
    if key not in _AVAILABILITY:
        try:
            _AVAILABILITY[key] = _load(name).is_available(device)
        except Exception as exc:
            _AVAILABILITY[key] = (False, f"{type(exc).__name__}: {exc}")
    return _AVAILABILITY[key]


def get_backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` (building it if needed), and why not; remembered per device."""
    return _check(name, torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = sorted(_REGISTRY, key=lambda n: -_REGISTRY[n][1])
    return [n for n in names if _check(n, device)[0]]


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """Return the backend called ``name`` for ``device``.

    Args:
        name: a registered backend name or ``"auto"``.
        device: where the tensors live.

    Raises:
        BackendUnavailableError: ``name`` is unknown, or was chosen explicitly and cannot run on ``device``.
    """
    device = torch.device(device)
    if name == "auto":
        return _auto(device)
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown backend '{name}'; choose one of {backend_names()}")
    ok, why = _check(name, device)
    if not ok:
        raise BackendUnavailableError(
            f"backend '{name}' cannot run on {device}: {why}. Available here: {available_backends(device)}"
        )
    return _load(name)


def _auto(device: torch.device) -> Backend:
    """``auto`` for ``device`` (one per device): measured per-op choice between its diagonal kernels and dense."""
    key = str(device)
    if key not in _AUTO:
        from dynadiag.kernels.auto import for_device

        diag = {"cpu": "cpu", "cuda": "cuda"}.get(device.type)
        if diag is not None and diag not in _WARNED:
            ok, why = _check(diag, device)
            if not ok:
                _WARNED.add(diag)
                warnings.warn(f"dynadiag: backend '{diag}' unavailable ({why}); auto uses dense GEMMs", stacklevel=3)
        _AUTO[key] = for_device(device)
    return _AUTO[key]
