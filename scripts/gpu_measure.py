"""The measurement steps of scripts/gpu_check.sh: per-op kernel times, K sweep, determinism, cost profile.

Every step appends JSON lines to ``<out>/results.jsonl`` as it goes (one line per measurement, then one
``{"step": ..., "status": "done"}`` line), so a run cut off by a time limit still reports what it measured, and
a re-run with the same ``--out`` skips the steps already done (and the groups of a step already measured).

    python scripts/gpu_measure.py --out DIR env|ops|ksweep|determinism|profile|one ...
    python scripts/gpu_measure.py --device cpu --out gpu-dry-run ops  # CPU dry run of the plumbing (tiny shapes)

Per-op times are CUDA-graph replays (eager calls where a method cannot be captured, e.g. CSR) of forward,
``grad_x`` (dX) and ``grad_V`` (dV) for the diagonal kernels (v1, and v2 when built), dense GEMMs in strict fp32,
TF32 and bf16 (forward, ``dY W`` and the full ``dY^T X`` that the dense path gathers ``dV`` from) and cuSPARSE CSR
with the same non-zeros. Useful TFLOP/s count ``2 K D N`` per op; the ceiling is the L1/shared-memory bound for
wrapped diagonals with free offsets (``--ceiling-tflops``, 15 on an H200: one activation element per FMA at
128 B/clk/SM; DESIGN.md section 4).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, Timer

from dynadiag.functional import num_active_diagonals
from dynadiag.kernels.dense import gather_weight, scatter_weight

TOKENS = (197, 1576, 12608, 50432)
CPU_TOKENS = (8, 40)  # dry run
CPU_SHAPES = {"proj": (48, 48), "fc1": (48, 192)}
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
OPS = ("fwd", "dx", "dv")


# ---------------------------------------------------------------------------------------------------- records
class Results:
    """``results.jsonl``: append-only records, read back to resume."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"
        self.records = []
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # killed mid-write: end that line so the next record starts clean
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write("\n")
            for line in text.splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut off mid-write by a kill: ignore it
                    continue

    def add(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)

    def done(self, step: str, group: str | None = None) -> bool:
        """Whether ``step`` finished (``group=None``) or one of its groups was already measured."""
        if group is None:
            return any(r.get("step") == step and r.get("status") == "done" for r in self.records)
        return any(r.get("step") == step and r.get("group") == group for r in self.records)

    def of(self, step: str, prefix: bool = False) -> list[dict]:
        """Measurement records of ``step`` (``prefix``: also of its tagged runs, e.g. ``ops_v2``)."""
        match = (lambda s: str(s).startswith(step)) if prefix else (lambda s: s == step)
        return [r for r in self.records if match(r.get("step")) and "status" not in r]


# ---------------------------------------------------------------------------------------------------- methods
def _problem(in_f: int, out_f: int, k: int, n: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values.to(device)
    values = (torch.randn(k, length, generator=gen) / math.sqrt(length)).to(device)
    x = torch.randn(n, in_f, generator=gen).to(device)
    gy = torch.randn(n, out_f, generator=gen).to(device)
    return x, values, offsets, gy


def _grouped_problem(in_f: int, out_f: int, group: int, sparsity: float, n: int, device: torch.device, seed: int = 0):
    """Like :func:`_problem` for a grouped layer: ``ceil(K / group)`` random groups of ``group`` consecutive offsets."""
    from dynadiag import groups as DG

    num_diag = max(in_f, out_f)
    kept = max(1, math.ceil(num_active_diagonals(in_f, out_f, sparsity) / group))
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(DG.num_groups(num_diag, group), generator=gen)[:kept]
    offsets = DG.group_offsets(chosen, num_diag, group)
    x, values, _, gy = _problem(in_f, out_f, offsets.numel(), n, device, seed)
    return x, values, offsets.to(device), gy


#: Tensor-core candidates for grouped layers (DIAG_OPS of their modules), measured with ``ops --grouped G``.
GROUPED_METHODS = ("grouped_triton", "bsr_triton")


def _diag_ops(version: str):
    """The three diagonal ops of a kernel version (v1: the registered ops, CPU or CUDA; v2: CUDA only) or of a
    grouped candidate (``grouped_triton``, ``bsr_triton``)."""
    if version == "v2":
        from dynadiag.kernels import cuda_v2

        return tuple(cuda_v2.DIAG_OPS[:3])  # DiagOps also carries an optional fused-bias forward
    if version in GROUPED_METHODS:
        import importlib

        return tuple(importlib.import_module(f"dynadiag.kernels.{version}").DIAG_OPS[:3])
    dd = torch.ops.dynadiag
    return dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v


def methods_for(in_f, out_f, k, x, values, offsets, gy, dtype, versions, dense=True, csr=True) -> dict:
    """name -> {op: closure} for one (shape, tokens, dtype)."""
    xs, vs, gys = x.to(dtype), values.to(dtype), gy.to(dtype)
    out: dict[str, dict[str, Callable[[], object]]] = {}
    for version in versions:
        fwd, bwd_x, bwd_v = _diag_ops(version)
        out[version if version in GROUPED_METHODS else f"diag_{version}"] = {
            "fwd": lambda f=fwd: f(xs, vs, offsets, out_f),
            "dx": lambda f=bwd_x: f(gys, vs, offsets, in_f),
            "dv": lambda f=bwd_v: f(gys, xs, offsets),
        }
    if dense:
        w = scatter_weight(vs, offsets, in_f, out_f)
        label = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        variants = [f"dense_{label}"] + (["dense_tf32"] if dtype == torch.float32 and x.is_cuda else [])
        for name in variants:
            out[name] = {
                "fwd": lambda w=w: F.linear(xs, w),
                "dx": lambda w=w: gys @ w,
                "dv": lambda: gather_weight(gys.t() @ xs, offsets),
            }
    if csr and dtype == torch.float32:
        out["csr_fp32"] = _csr_ops(in_f, out_f, k * min(in_f, out_f), x, gy)
    return out


def _csr_ops(in_f: int, out_f: int, nnz: int, x: torch.Tensor, gy: torch.Tensor) -> dict:
    """torch.sparse CSR (cuSPARSE on CUDA) with ``nnz`` random entries: ``W X^T``, ``W^T dY^T``, sampled ``dY^T X``."""
    flat = torch.randperm(in_f * out_f, device=x.device)[:nnz]
    dense = torch.zeros(in_f * out_f, device=x.device)
    dense[flat] = torch.randn(nnz, device=x.device)
    dense = dense.view(out_f, in_f)
    w, wt = dense.to_sparse_csr(), dense.t().contiguous().to_sparse_csr()
    pattern = torch.sparse_csr_tensor(w.crow_indices(), w.col_indices(), torch.zeros_like(w.values()), w.shape)
    xt, gyt = x.t(), gy.t()
    return {
        "fwd": lambda: torch.mm(w, xt),
        "dx": lambda: torch.mm(wt, gyt),
        "dv": lambda: torch.sparse.sampled_addmm(pattern, gyt.contiguous(), x),
    }


def time_methods(methods: dict, device: torch.device, reps: int) -> dict[str, dict[str, float]]:
    """Min over ``reps`` of each op's time (ms), graph-replayed on CUDA; NaN where a method fails."""
    timer = Timer(device, "process" if device.type == "cpu" else "wall")
    best: dict[str, dict[str, float]] = {}
    for name, ops in methods.items():
        tf32 = name == "dense_tf32"
        best[name] = {}
        for op, fn in ops.items():
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                fn()  # warm-up: JIT build, plans, cuBLAS heuristics
                best[name][op] = min(timer(fn, graph=device.type == "cuda") for _ in range(reps))
            except Exception as exc:  # record and go on: one failing method must not cost the others
                print(f"    {name} {op}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                best[name][op] = float("nan")
            finally:
                if device.type == "cuda":
                    torch.backends.cuda.matmul.allow_tf32 = False
    return best


# ---------------------------------------------------------------------------------------------------- steps
def step_env(res: Results, args) -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(args.device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "kernels": os.environ.get("DYNADIAG_CUDA_KERNELS", "v1"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}"
        )
    smi = "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
    commands = (
        ["nvidia-smi", smi, "--format=csv,noheader"],
        ["nvcc", "--version"],
        [os.environ.get("CXX", "c++"), "--version"],
    )
    for cmd in commands:
        if shutil.which(cmd[0]):
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
            lines = text.splitlines() or [""]
            info[cmd[0]] = lines[-1] if cmd[0] == "nvcc" else lines[0]
    res.add({"step": "env", **info})


def _shapes_tokens(args):
    if args.device.type == "cpu":
        return CPU_SHAPES, CPU_TOKENS
    return {name: SHAPES[name] for name in args.shapes}, tuple(args.tokens)


def step_ops(res: Results, args) -> None:
    """Every (token count, shape, dtype) group, token counts outermost: the first ones (197 and 12,608 in
    gpu_check.sh) are complete for every shape before a later one starts. ``--grouped G``: grouped layers
    (runs of ``G`` consecutive offsets) with the grouped candidates."""
    shapes, tokens = _shapes_tokens(args)
    for n in tokens:
        for name, (in_f, out_f) in shapes.items():
            for dtype in (torch.float32, torch.bfloat16):
                label = f"{name}-g{args.grouped}" if args.grouped else name
                group = f"{label}/{n}/{dtype}"
                if res.done(args.name, group):
                    continue
                t0 = time.perf_counter()
                if args.grouped:
                    x, values, offsets, gy = _grouped_problem(in_f, out_f, args.grouped, args.sparsity, n, args.device)
                else:
                    x, values, offsets, gy = _problem(in_f, out_f, num_active_diagonals(in_f, out_f, args.sparsity),
                                                      n, args.device)  # fmt: skip
                k = offsets.numel()
                baselines = not args.no_baselines
                methods = methods_for(
                    in_f, out_f, k, x, values, offsets, gy, dtype, args.versions, dense=baselines,
                    csr=baselines and not args.no_csr,
                )  # fmt: skip
                best = time_methods(methods, args.device, args.reps)
                useful = 2.0 * k * min(in_f, out_f) * n
                dense_ms = best.get("dense_fp32" if dtype == torch.float32 else "dense_bf16") or _dense_from(res, group)
                for method, times in best.items():
                    for op, ms in times.items():
                        tflops = useful / (ms * 1e9) if ms == ms and ms > 0 else None
                        ref = dense_ms.get(op)
                        res.add({
                            "step": args.name, "group": group, "shape": label, "in": in_f, "out": out_f, "k": k,
                            "tokens": n, "dtype": str(dtype).split(".")[-1], "method": method, "op": op, "ms": ms,
                            "useful_tflops": tflops,
                            "ceiling_frac": tflops / args.ceiling_tflops if tflops else None,
                            "vs_dense_same_dtype": ref / ms if ref and ms == ms and ms > 0 else None,
                        })  # fmt: skip
                print(f"  ops {group}: {time.perf_counter() - t0:.1f} s", flush=True)
    res.add({"step": args.name, "status": "done"})


def _dense_from(res: Results, group: str) -> dict[str, float]:
    """Dense times of the same group measured by an earlier (untagged) ops run, for the speedup column."""
    dtype = group.rsplit("/", 1)[-1].split(".")[-1]
    method = "dense_fp32" if dtype == "float32" else "dense_bf16"
    return {r["op"]: r["ms"] for r in res.of("ops", prefix=True) if r["group"] == group and r["method"] == method}


def fit_line(ks: list[float], ms: list[float]) -> tuple[float, float, float]:
    """Least-squares ``ms = a + b K``; returns ``(a, b, r2)``."""
    n = len(ks)
    mk, mt = sum(ks) / n, sum(ms) / n
    sxx = sum((k - mk) ** 2 for k in ks)
    b = sum((k - mk) * (t - mt) for k, t in zip(ks, ms, strict=True)) / sxx if sxx else 0.0
    a = mt - b * mk
    ss = sum((t - mt) ** 2 for t in ms)
    r2 = 1.0 - sum((t - a - b * k) ** 2 for k, t in zip(ks, ms, strict=True)) / ss if ss else 1.0
    return a, b, r2


def step_ksweep(res: Results, args) -> None:
    shapes, tokens = _shapes_tokens(args)
    n = max(t for t in tokens if t <= 12608) if args.device.type == "cuda" else tokens[-1]
    for name in [s for s in ("proj", "fc1") if s in shapes]:
        in_f, out_f = shapes[name]
        group = f"{name}/{n}"
        if res.done(args.name, group):
            continue
        rows: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for s in SWEEP:
            k = num_active_diagonals(in_f, out_f, s)
            x, values, offsets, gy = _problem(in_f, out_f, k, n, args.device)
            methods = methods_for(in_f, out_f, k, x, values, offsets, gy, torch.float32, args.versions, False, False)
            for method, times in time_methods(methods, args.device, args.reps).items():
                for op, ms in times.items():
                    rows.setdefault((method, op), []).append((k, ms))
        for (method, op), pts in rows.items():
            pts = [(k, ms) for k, ms in pts if ms == ms]
            a, b, r2 = fit_line([k for k, _ in pts], [ms for _, ms in pts]) if len(pts) >= 2 else (None,) * 3
            res.add({"step": args.name, "group": group, "shape": name, "tokens": n, "method": method, "op": op,
                     "points": pts, "a_ms": a, "b_ms_per_diag": b, "r2": r2})  # fmt: skip
    res.add({"step": args.name, "status": "done"})


def step_determinism(res: Results, args) -> None:
    shapes, tokens = _shapes_tokens(args)
    name = "fc1"
    in_f, out_f = shapes[name]
    n = 12608 if args.device.type == "cuda" else tokens[-1]
    k = num_active_diagonals(in_f, out_f, args.sparsity)
    x, _values, offsets, gy = _problem(in_f, out_f, k, n, args.device)
    timer = Timer(args.device, "process" if args.device.type == "cpu" else "wall")
    # Default mode, then under torch.use_deterministic_algorithms(True) (v1's grad_V then adds per-slice sums in a
    # fixed order instead of atomics: bitwise equal, at the cost measured here).
    for version, deterministic in [(v, d) for v in args.versions for d in (False, True)]:
        group = f"{name}/{n}/{version}" + ("/deterministic" if deterministic else "")
        if res.done(args.name, group):
            continue
        bwd_v = _diag_ops(version)[2]
        torch.use_deterministic_algorithms(deterministic)
        try:
            runs = [bwd_v(gy, x, offsets) for _ in range(5)]
            same = all(torch.equal(runs[0], r) for r in runs[1:])
            spread = max(float((r - runs[0]).abs().max()) for r in runs[1:])
            ms = min(timer(lambda f=bwd_v: f(gy, x, offsets)) for _ in range(args.reps))
            res.add({"step": args.name, "group": group, "version": version, "deterministic_mode": deterministic,
                     "bitwise_equal": same, "max_abs_diff": spread, "dv_ms": ms})  # fmt: skip
        except Exception as exc:
            res.add({"step": args.name, "group": group, "version": version, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            torch.use_deterministic_algorithms(False)
    res.add({"step": args.name, "status": "done"})


def derive_profile(records: list[dict], version: str, name: str):
    """A cost profile (dynadiag.kernels.costmodel) from the ``ops`` records of the largest token count."""
    from dynadiag.kernels.costmodel import H200_PRIOR, DeviceProfile

    fp32 = [r for r in records if r["dtype"] == "float32" and r["ms"] == r["ms"] and r["ms"] > 0]
    if not fp32:
        return None
    n = max(r["tokens"] for r in fp32)
    big = [r for r in fp32 if r["tokens"] == n]

    def rate(pred, flops_key):
        rates = [(r[flops_key] if flops_key != "full" else 2.0 * r["in"] * r["out"] * n / 1e12) / (r["ms"] / 1e3)
                 for r in big if pred(r)]  # fmt: skip
        return sum(rates) / len(rates) if rates else None

    def useful(r):
        return 2.0 * r["k"] * min(r["in"], r["out"]) * n / 1e12

    for r in big:
        r["useful_tf"] = useful(r)
    diag = f"diag_{version}"
    tall = {"fwd": lambda r: r["out"] > r["in"], "dx": lambda r: r["in"] > r["out"]}
    apply_tall = rate(lambda r: r["method"] == diag and r["op"] in tall and tall[r["op"]](r), "useful_tf")
    apply_wide = rate(lambda r: r["method"] == diag and r["op"] in tall and not tall[r["op"]](r), "useful_tf")
    sddmm = rate(lambda r: r["method"] == diag and r["op"] == "dv", "useful_tf")
    dense = {
        key: rate(lambda r, m=method: r["method"] == m, "full")
        for key, method in (("fp32", "dense_fp32"), ("tf32", "dense_tf32"), ("bf16", "dense_bf16"))
    }
    if None in (apply_wide, sddmm) or dense["fp32"] is None:
        return None
    small = [r for r in fp32 if r["tokens"] == min(x["tokens"] for x in fp32)]
    floor = lambda m: min((r["ms"] for r in small if r["method"].startswith(m)), default=0.01)  # noqa: E731
    dense_rates = {k: v for k, v in dense.items() if v is not None}
    dense_rates.setdefault("tf32", dense_rates["fp32"])
    dense_rates.setdefault("bf16", H200_PRIOR.dense["bf16"])
    dense_rates.update(fp16=dense_rates["bf16"], fp64=H200_PRIOR.dense["fp64"])
    return DeviceProfile(
        name=name,
        source=f"scripts/gpu_measure.py ops, {version} kernels, {n} tokens",
        diag={"apply_wide": apply_wide, "apply_tall": apply_tall or apply_wide, "sddmm": sddmm},
        dense=dense_rates,
        diag_floor_ms=floor("diag"),
        dense_floor_ms=floor("dense"),
    )


def step_profile(res: Results, args) -> None:
    from dynadiag.kernels.costmodel import save_profile

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-dry-run"
    for version in args.versions:
        profile = derive_profile(res.of("ops", prefix=True), version, name)
        if profile is None:
            res.add({"step": "profile", "version": version, "error": "not enough ops records"})
            continue
        (args.out / f"cost_profile_{version}.json").write_text(profile.to_json())
        cached = str(save_profile(profile)) if version == os.environ.get("DYNADIAG_CUDA_KERNELS", "v1") else None
        res.add({"step": "profile", "version": version, "profile": json.loads(profile.to_json()), "cached": cached})
    res.add({"step": "profile", "status": "done"})


PROBE_SOURCE = r"""
// Which TORCH_CHECK messages crash this process? (The H200 run of 50365c8 segfaulted on the first failing check
// whose message streamed an int64_t; checks with only C strings raised.) One op per message kind.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <cstdint>
#include "dd_check.h"

namespace {
int64_t fail_c_string(int64_t v) { TORCH_CHECK(v < 0, "plain C string"); return v; }
int64_t fail_scalar_type(int64_t v) { TORCH_CHECK(v < 0, "scalar type ", at::kFloat, " streamed"); return v; }
int64_t fail_int64_stream(int64_t v) { TORCH_CHECK(v < 0, "int64 streamed: ", v); return v; }
int64_t fail_std_string(int64_t v) { TORCH_CHECK(v < 0, std::string("std::string streamed")); return v; }
int64_t fail_dd_check(int64_t v) { DD_CHECK(v < 0, "DD_CHECK with int64 ", v); return v; }
}  // namespace

TORCH_LIBRARY(dynadiag_probe, m) {
  m.def("fail_c_string(int v) -> int", &fail_c_string);
  m.def("fail_scalar_type(int v) -> int", &fail_scalar_type);
  m.def("fail_int64_stream(int v) -> int", &fail_int64_stream);
  m.def("fail_std_string(int v) -> int", &fail_std_string);
  m.def("fail_dd_check(int v) -> int", &fail_dd_check);
}
"""
PROBE_KINDS = ("fail_c_string", "fail_scalar_type", "fail_int64_stream", "fail_std_string", "fail_dd_check")


def _probe_library(out: Path) -> Path:
    from dynadiag.kernels._build import load_extension
    from dynadiag.kernels.ops import CSRC

    src = out / "check_probe" / "check_probe.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(PROBE_SOURCE)
    return load_extension("dynadiag_check_probe", [src], extra_cflags=("-O2", f"-I{CSRC}"), extra_ldflags=())


def step_probe(res: Results, args) -> None:
    """Each TORCH_CHECK message kind in its own process: raised normally, or crashed (and with which signal)."""
    library = _probe_library(args.out)
    for kind in PROBE_KINDS:
        if res.done("probe", kind):
            continue
        code = (
            "import sys, torch\n"
            "torch.ops.load_library(sys.argv[1])\n"
            "try:\n"
            f"    torch.ops.dynadiag_probe.{kind}(1)\n"
            "except RuntimeError as exc:\n"
            "    print('raised:', str(exc).splitlines()[0])\n"
        )
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", code, str(library)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        res.add({"step": "probe", "group": kind, "rc": proc.returncode, "raised": "raised:" in proc.stdout,
                 "stdout": proc.stdout.strip()[-300:], "stderr_tail": proc.stderr.strip()[-1500:]})  # fmt: skip
    res.add({"step": "probe", "status": "done"})


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def step_report(res: Results, args) -> None:
    """``<out>/README.md``: the tables from results.jsonl (re-written on every call)."""
    lines = [f"# GPU check: {args.out.name}", ""]
    env = [r for r in res.records if r.get("step") == "env"]
    if env:
        e = env[-1]
        lines += [f"{e.get('gpu')} ({e.get('nvidia-smi', '')}); torch {e.get('torch')}, CUDA {e.get('cuda')}; "
                  f"{e.get('nvcc', '')}; kernels selected: {e.get('kernels')}", ""]  # fmt: skip
    runs = [r for r in res.records if str(r.get("step", "")).endswith(":run")]
    if runs:
        lines += ["| step | status | rc | seconds |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['step'][:-4]} | {r.get('status')} | {r.get('rc')} | {r.get('seconds')} |" for r in runs]
        lines.append("")
    probes = res.of("probe")
    if probes:
        lines += ["TORCH_CHECK probe (each message kind in its own process):", "", "| kind | rc | raised |",
                  "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {r['group']} | {r['rc']} | {r['raised']} |" for r in probes]
        lines.append("")
    ops = res.of("ops", prefix=True)
    if ops:
        lines += ["Per-op times (ms, CUDA-graph replay), useful TFLOP/s (2 K D N / t), fraction of the "
                  f"{args.ceiling_tflops:g} TFLOP/s ceiling, speedup vs dense of the same dtype (strict fp32 / bf16):",
                  "", "| shape | tokens | dtype | method | fwd ms | dX ms | dV ms | fwd TF/s | fwd ceil | "
                  "fwd vs dense | dX vs dense | dV vs dense |", "| --- " * 12 + "|"]  # fmt: skip
        table: dict[tuple, dict[str, dict]] = {}
        for r in ops:
            table.setdefault((r["shape"], r["tokens"], r["dtype"], r["method"]), {})[r["op"]] = r
        for (shape, n, dtype, method), row in table.items():
            f, x, v = (row.get(o, {}) for o in OPS)
            lines.append(
                f"| {shape} | {n} | {dtype} | {method} | {_fmt(f.get('ms'))} | {_fmt(x.get('ms'))} | "
                f"{_fmt(v.get('ms'))} | {_fmt(f.get('useful_tflops'), '.2f')} | {_fmt(f.get('ceiling_frac'), '.2f')} | "
                f"{_fmt(f.get('vs_dense_same_dtype'), '.2f')} | {_fmt(x.get('vs_dense_same_dtype'), '.2f')} | "
                f"{_fmt(v.get('vs_dense_same_dtype'), '.2f')} |"
            )
        lines.append("")
    sweep = res.of("ksweep", prefix=True)
    if sweep:
        lines += ["K sweep (fp32, time = a + b K):", "", "| shape | tokens | method | op | a ms | b us/diag | r2 |",
                  "| --- " * 7 + "|"]  # fmt: skip
        for r in sweep:
            b = r["b_ms_per_diag"] * 1e3 if r["b_ms_per_diag"] is not None else None
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']} | {r['op']} | {_fmt(r['a_ms'])} | "
                         f"{_fmt(b)} | {_fmt(r['r2'])} |")  # fmt: skip
        lines.append("")
    det = res.of("determinism", prefix=True)
    if det:
        lines += ["dV determinism (5 calls):", ""]
        lines += [f"- {r['group']}: bitwise equal {r.get('bitwise_equal')}, max diff {r.get('max_abs_diff')}, "
                  f"dV {_fmt(r.get('dv_ms'))} ms{' ' + r['error'] if 'error' in r else ''}" for r in det]  # fmt: skip
        lines.append("")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def step_one(args) -> None:
    """One op, a few calls (for ncu): ``--shape --tokens --op --method``."""
    in_f, out_f = SHAPES[args.shapes[0]]
    k = num_active_diagonals(in_f, out_f, args.sparsity)
    x, values, offsets, gy = _problem(in_f, out_f, k, args.tokens[0], args.device)
    fn = methods_for(in_f, out_f, k, x, values, offsets, gy, torch.float32, [args.method.split("_")[-1]], False, False)
    call = fn[args.method][args.op]
    for _ in range(3):
        call()
    if args.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["env", "probe", "ops", "ksweep", "determinism", "profile", "report", "one"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--versions", nargs="+", default=None, help="diagonal kernel versions (default: v1 v2 on CUDA)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ceiling-tflops", type=float, default=15.0)
    parser.add_argument("--op", default="fwd", choices=OPS)
    parser.add_argument("--method", default="diag_v1")
    parser.add_argument("--tag", default="", help="suffix of the step's name in results.jsonl, e.g. _v2")
    parser.add_argument("--no-baselines", action="store_true", help="ops: diagonal kernels only (no dense, no CSR)")
    parser.add_argument("--no-csr", action="store_true", help="ops: no cuSPARSE CSR baseline")
    parser.add_argument("--grouped", type=int, default=0, help="ops: grouped layers with runs of this many offsets")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.name = args.step + args.tag
    if args.versions is None:
        args.versions = ["v1", "v2"] if args.device.type == "cuda" else ["v1"]
    torch.set_float32_matmul_precision("highest")  # strict fp32 unless a method asks for TF32
    if args.step not in ("env", "probe", "report"):
        if args.device.type == "cuda":
            from dynadiag.kernels import cuda

            cuda.load_cuda_library()
        else:
            from dynadiag.kernels.cpu import load_cpu_library

            load_cpu_library()
    if args.step == "one":
        step_one(args)
        return 0
    res = Results(args.out)
    if args.step == "report":
        step_report(res, args)
        return 0
    if res.done(args.name):
        print(f"{args.name}: already done in {res.path}, skipping")
        return 0
    {"env": step_env, "probe": step_probe, "ops": step_ops, "ksweep": step_ksweep, "determinism": step_determinism,
     "profile": step_profile}[args.step](res, args)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
