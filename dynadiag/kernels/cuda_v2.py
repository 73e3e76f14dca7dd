"""Host side of the v2 CUDA kernels (``csrc/cuda/diag_kernels_v2.cu``): launch shapes, cached plans, the ops.

UNVALIDATED ON HARDWARE: the v2 kernels compile for sm_80/sm_90 in CI and their plans are checked on CPU
(``tests/test_kernels_plan.py``, ``tests/test_kernels_cuda_v2.py``), but they have never run on a GPU. The ``cuda``
backend uses them only when ``DYNADIAG_CUDA_KERNELS=v2`` is set (default ``v1``), so the next GPU run
(``scripts/gpu_check.sh``) can compare both before either becomes the default.

Per layer and op, a plan (:mod:`dynadiag.kernels.plan`) is made once per offsets tensor and version (a host
synchronisation: the offsets are read on the CPU) and kept on the device; the values are packed into output
coordinates on every call (one gather, so a training step's updated ``V`` is always used).

Where v2 cannot run, the v1 kernels take over, visibly: an apply whose staging window does not fit in the GPU's
shared memory per block warns once per shape and runs v1's apply (:func:`apply`); ``grad_V`` in fp64 or with rows too
wide for v2's shared-memory window runs v1's kernel in its deterministic mode (per-slice partial sums added in a
fixed order, no atomics), so v2's ``grad_V`` is bitwise reproducible for every dtype and shape.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass

import torch

from dynadiag.kernels import ops
from dynadiag.kernels.dense import DiagOps
from dynadiag.kernels.plan import ApplyPlan, pack_values, plan_apply

__all__ = [
    "BATCH1_TOKENS",
    "DIAG_OPS",
    "LaunchShape",
    "apply",
    "apply_pitch",
    "apply_smem",
    "kernel_version",
    "launch_shape",
    "prepare",
    "window_limit",
]

KERNELS_ENV = "DYNADIAG_CUDA_KERNELS"
_WARNED = False
#: Token counts up to this take the batch-1 path (one warp of tokens per tile, four warps splitting the diagonals).
BATCH1_TOKENS = 2048


def kernel_version() -> str:
    """``"v1"`` (default) or ``"v2"``, from ``$DYNADIAG_CUDA_KERNELS``."""
    version = os.environ.get(KERNELS_ENV, "v1").strip().lower() or "v1"
    if version not in ("v1", "v2"):
        raise ValueError(f"{KERNELS_ENV} must be 'v1' or 'v2', got {version!r}")
    global _WARNED
    if version == "v2" and not _WARNED:
        _WARNED = True
        warnings.warn(
            "dynadiag: DYNADIAG_CUDA_KERNELS=v2 selects CUDA kernels that have not been validated on a GPU yet "
            "(compiled and checked on CPU mirrors only); run scripts/gpu_check.sh before trusting them",
            stacklevel=2,
        )
    return version


@dataclass(frozen=True)
class LaunchShape:
    """Outputs per tile, warps along tokens (8 tokens each) and warps splitting a tile's diagonals."""

    tile: int
    warps_tokens: int
    ksplit: int


def launch_shape(tokens: int, dtype: torch.dtype) -> LaunchShape:
    """Tiles of 128 outputs (64 for fp64); 32 tokens per tile, or 8 tokens and a 4-way diagonal split at batch 1."""
    tile = 64 if dtype == torch.float64 else 128
    if tokens <= BATCH1_TOKENS:
        return LaunchShape(tile, 1, 4)
    return LaunchShape(tile, 4, 1)


def apply_pitch(tokens: int, itemsize: int) -> int:
    """Staged column pitch in elements (``csrc/cuda/diag_common.cuh`` ``apply_pitch``): the tokens rounded up to an
    odd number of 16-byte units, so the kernel's 16-byte shared loads at neighbouring columns are conflict-free."""
    units = -(-tokens * itemsize // 16)
    return (units | 1) * 16 // itemsize


def _apply_bytes(shape: LaunchShape, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes per staged column (kernel: ``SP * sizeof(T)``) and of the split-reduction buffer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc_size = 8 if dtype == torch.float64 else 4
    tokens = 8 * shape.warps_tokens
    return apply_pitch(tokens, itemsize) * itemsize, (shape.ksplit - 1) * tokens * shape.tile * acc_size


def apply_smem(shape: LaunchShape, dtype: torch.dtype, window: int) -> int:
    """Dynamic shared memory of one v2 apply launch (kernel: ``launch_apply_v2``): two staging buffers of
    ``window`` columns and the split-reduction buffer."""
    pitch, reduce_bytes = _apply_bytes(shape, dtype)
    return 2 * pitch * window + reduce_bytes


def window_limit(shape: LaunchShape, dtype: torch.dtype, smem_per_block: int, smem_per_sm: int) -> int:
    """Most extended columns one of the two staging buffers holds, sized for two blocks per SM (at least a tile:
    a GPU whose shared memory cannot hold even that makes :func:`apply` take the v1 kernel)."""
    pitch, reduce_bytes = _apply_bytes(shape, dtype)
    budget = min(smem_per_block, smem_per_sm // 2 - 1024) - reduce_bytes
    return max(shape.tile, budget // 2 // pitch)


def _smem(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":  # planning on CPU (tests): an H100/H200's 227 KiB per block, 228 KiB per SM
        return 227 * 1024, 228 * 1024
    props = torch.cuda.get_device_properties(device)
    per_block = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    return per_block, getattr(props, "shared_memory_per_multiprocessor", per_block + 1024)


# id(offsets) -> (weak reference, version, data pointer, {(A, B, tall, tile, wmax): plan on the offsets' device})
_PLANS: dict[int, tuple[weakref.ref, int, int, dict[tuple, ApplyPlan]]] = {}


def _plan(offsets: torch.Tensor, A: int, B: int, tall: bool, tile: int, wmax: int) -> ApplyPlan:
    """The plan for these offsets (cached per tensor and version; rebuilt after an in-place change)."""
    key = id(offsets)
    state = (offsets._version, offsets.data_ptr())
    entry = _PLANS.get(key)
    if entry is None or entry[0]() is not offsets or entry[1:3] != state:
        if len(_PLANS) > 1024:
            for stale in [k for k, e in _PLANS.items() if e[0]() is None]:
                del _PLANS[stale]
        entry = (weakref.ref(offsets), *state, {})
        _PLANS[key] = entry
    plans = entry[3]
    spec = (A, B, tall, tile, wmax)
    if spec not in plans:
        ops.check_offsets(offsets, max(A, B), "cuda v2")
        plans[spec] = plan_apply(offsets, A, B, tall, tile, wmax).to(offsets.device)
    return plans[spec]


def prepare(
    src: torch.Tensor,  # [N, A]
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K]
    out_cols: int,
    tall: bool,
) -> tuple[ApplyPlan, torch.Tensor, LaunchShape]:  # plan, vpack [E, tile], launch shape
    """Everything one v2 apply launch needs (runs on CPU tensors too: the tests check it with the emulator)."""
    shape = launch_shape(src.shape[0], src.dtype)
    wmax = window_limit(shape, src.dtype, *_smem(src.device))
    plan = _plan(offsets, src.shape[1], out_cols, tall, shape.tile, wmax)
    return plan, pack_values(values.to(src.dtype), plan), shape


def _v1_apply(src: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_cols: int, tall: bool):
    """The same apply primitive through the v1 ops: ``diag_fwd`` computes the form ``out_cols >= A`` picks,
    ``diag_bwd_x`` the other one (the two differ only for square layers)."""
    if tall == (out_cols >= src.shape[1]):
        return torch.ops.dynadiag.diag_fwd(src, values, offsets, out_cols)
    return torch.ops.dynadiag.diag_bwd_x(src, values, offsets, out_cols)


_FALLBACK_WARNED: set[tuple] = set()


@torch.compiler.disable  # planning reads the offsets on the host and keeps Python caches: not traceable
def apply(src: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_cols: int, tall: bool) -> torch.Tensor:
    """One v2 apply primitive, ``src [N, A] -> [N, out_cols]`` (see :mod:`dynadiag.kernels.plan`).

    Where the plan's staging window does not fit in the GPU's shared memory per block, the v1 kernel computes it
    (one warning per shape): same result, v1's speed.
    """
    plan, vpack, shape = prepare(src, values, offsets, out_cols, tall)
    need = apply_smem(shape, src.dtype, plan.max_window)
    per_block = _smem(src.device)[0]
    if need > per_block:
        key = (src.shape[1], out_cols, tall, src.dtype, shape)
        if key not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(key)
            warnings.warn(
                f"dynadiag: the v2 apply kernel needs {need} bytes of shared memory per block for {src.shape[1]} -> "
                f"{out_cols} ({src.dtype}), this GPU allows {per_block}: this layer takes the v1 kernel",
                stacklevel=2,
            )
        return _v1_apply(src, values, offsets, out_cols, tall)
    return torch.ops.dynadiag.diag_apply_v2(
        src.contiguous(),
        vpack,
        plan.shifts,
        plan.chunks,
        plan.tile_chunks,
        out_cols,
        tall,
        plan.max_window,
        shape.warps_tokens,
        shape.ksplit,
    )


def _fwd(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_features: int) -> torch.Tensor:
    return apply(x, values, offsets, out_features, tall=out_features >= x.shape[1])


def _bwd_x(grad_y: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    # grad_x = grad_y W: the transposed pattern, the other form (square layers: forward tall, grad_x wide).
    return apply(grad_y, values, offsets, in_features, tall=not grad_y.shape[1] >= in_features)


def _bwd_v(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.ops.dynadiag.diag_bwd_v_v2(grad_y, x, offsets)


#: The v2 ops with the signatures of ``torch.ops.dynadiag.diag_fwd`` / ``diag_bwd_x`` / ``diag_bwd_v``.
DIAG_OPS = DiagOps(_fwd, _bwd_x, _bwd_v)
