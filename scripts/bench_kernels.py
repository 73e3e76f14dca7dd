"""Benchmark frozen DiagLinear kernels against dense ``F.linear`` and ``torch.sparse`` CSR with the same nnz.

For the four ViT-B layer shapes, two token counts and six sparsities, times forward, backward (grad of the input
and of the weights) and forward+backward of:

- dense ``F.linear`` in fp32 and bf16 (on CUDA also TF32), the sparsity-independent baseline;
- torch.sparse CSR (fp32, random unstructured pattern with the same nnz): ``W @ x^T``, ``W^T @ dY^T`` and
  ``sampled_addmm`` for the weight gradient;
- the ``reference`` backend (dense materialisation) and every other backend available on the device, in fp32
  and bf16 (bf16 is compared with dense bf16, which runs on AMX / tensor cores).

Methods are interleaved within each repeat and the minimum (or, with ``--stat median``, the median) over repeats is
kept, so load from other processes hits all methods alike. With several ``--threads`` every case is timed at each
thread count in the same run (1 thread on ``--clock process``: CPU time of the process; more threads always on the
wall clock). Prints ratios vs dense and vs CSR and the fraction of the FLOP ceiling ``1/(1-s)``; writes
``<out>/bench_kernels.json`` (with the CPU model, its ISA flags and the load average) and one
``<out>/bench_kernels_t<threads>.png`` per thread count.

    python scripts/bench_kernels.py --device cpu --threads 1 2 --clock process --out docs/benchmarks/cpu
    python scripts/bench_kernels.py --device cuda --quick

CPU kernel variants: ``--isa avx2 portable`` times the ``cpu`` backend once per variant (methods ``cpu-avx2``,
``cpu-portable``, interleaved in one run; ``DYNADIAG_CPU_ISA`` is set around each call). The JSON records the
variants, the one the CPU would pick, torch's CPU capability and whether the run is *emulated*: a variant below the
CPU's own, or a dense side capped with ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS`` (set those before the
process starts). An AVX2-only CPU emulated on an AVX-512 one:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python scripts/bench_kernels.py --isa avx2 \
        --threads 1 --clock process --stat median --sparsities 0.9 --out docs/benchmarks/cpu/zen5-avx2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from dynadiag.functional import num_active_diagonals
from dynadiag.kernels import available_backends, get_backend

DENSE_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
TOKENS = (197, 1576)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
PHASES = ("fwd", "bwd", "fb")


class Timer:
    """Time per call of a callable: ``perf_counter`` on CPU, CUDA events on GPU.

    On GPU the events bracket several back-to-back calls (about 2 ms in all), so launch gaps overlap with work.
    With ``graph=True`` the calls are replays of a captured CUDA graph: this measures GPU time without the
    Python and launch overhead that otherwise dominates batch-1 layers (tens of microseconds of GPU work); if a
    method cannot be captured it is timed with eager calls and ``graphed(fn)`` says so.
    """

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        # "process": CPU time of this process. With one thread it excludes the time the thread sat descheduled
        # behind other processes, which makes comparisons on a shared machine far less noisy.
        self.clock = time.process_time if clock == "process" else time.perf_counter
        self.clock_name = "cuda_events" if self.cuda else clock
        self._graphs: dict = {}
        self._iters: dict = {}

    def __call__(self, fn: Callable[[], object], graph: bool = False) -> float:  # milliseconds
        if self.cuda:
            if graph and fn not in self._graphs:
                self._graphs[fn] = _capture_graph(fn)
            run = self._graphs[fn].replay if graph and self._graphs[fn] is not None else fn
            if fn not in self._iters:
                self._iters[fn] = max(1, min(50, int(2.0 / max(_cuda_ms(run, 1), 1e-3))))
            return _cuda_ms(run, self._iters[fn])
        t0 = self.clock()
        fn()
        return (self.clock() - t0) * 1e3

    def graphed(self, fn: Callable[[], object]) -> bool:
        return self._graphs.get(fn) is not None


def _cuda_ms(run: Callable[[], object], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph | None:
    """Capture ``fn`` (after a warm-up on a side stream, as CUDA graphs require); ``None`` if it cannot be."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception as exc:  # e.g. a host synchronisation inside a sparse library call
        print(f"    (no CUDA graph, timing eager calls: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None


def _phases(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad_y: torch.Tensor) -> dict:
    """fwd / bwd / fb closures for a differentiable forward; bwd reuses one graph (retain_graph)."""
    state = {}

    def fwd():
        with torch.no_grad():
            return forward()

    def bwd():
        if "y" not in state:
            state["y"] = forward()
        return torch.autograd.grad(state["y"], inputs, grad_y, retain_graph=True)

    def fb():
        return torch.autograd.grad(forward(), inputs, grad_y)

    return {"fwd": fwd, "bwd": bwd, "fb": fb}


@contextmanager
def _cpu_isa(isa: str | None):
    """Run the ``cpu`` backend's ``isa`` variant inside the block (``None``: leave the dispatch alone)."""
    if isa is None:
        yield
        return
    old = os.environ.get("DYNADIAG_CPU_ISA")
    os.environ["DYNADIAG_CPU_ISA"] = isa
    try:
        yield
    finally:
        if old is None:
            del os.environ["DYNADIAG_CPU_ISA"]
        else:
            os.environ["DYNADIAG_CPU_ISA"] = old


def _with_isa(fn: Callable[[], object], isa: str) -> Callable[[], object]:
    def run():
        with _cpu_isa(isa):
            return fn()

    return run


def cpu_isa_info(isas: tuple[str, ...]) -> dict:
    """The CPU kernel variants timed, the one the CPU would pick, and how each one's figures are to be read.

    Per variant: ``native`` (the CPU's own variant against its own dense), ``emulated`` (the dense side capped with
    ``ONEDNN_MAX_CPU_ISA``/``MKL_ENABLE_INSTRUCTIONS``: a CPU with that variant emulated) or ``forced`` (a lower
    variant against the uncapped dense of this CPU).
    """
    from dynadiag.kernels import cpu

    with _cpu_isa("auto"):
        native = cpu.isa()
    caps = {k: os.environ[k] for k in DENSE_CAPS if os.environ.get(k)}
    timed = list(isas) or [native]
    label = {v: "emulated" if caps else ("native" if v == native else "forced") for v in timed}
    return {
        "variants": label,
        "native_variant": native,
        "supported": cpu.supported_isas(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dense_caps": caps,
        "emulated": bool(caps),
    }


def _csr_phases(in_f: int, out_f: int, nnz: int, x: torch.Tensor, grad_y: torch.Tensor) -> dict:
    """Unstructured CSR with ``nnz`` random entries; explicit sparse products (no autograd support needed)."""
    device = x.device
    flat = torch.randperm(in_f * out_f, device=device)[:nnz]
    mask = torch.zeros(in_f * out_f, dtype=torch.bool, device=device)
    mask[flat] = True
    dense = torch.randn(out_f, in_f, device=device) * mask.view(out_f, in_f)
    w = dense.to_sparse_csr()  # [out, in]
    wt = dense.t().contiguous().to_sparse_csr()  # [in, out], for grad_x
    pattern = torch.sparse_csr_tensor(w.crow_indices(), w.col_indices(), torch.zeros_like(w.values()), w.shape)
    xt, gyt = x.t(), grad_y.t()

    def fwd():
        return torch.mm(w, xt)  # [out, N]

    def bwd():
        gx = torch.mm(wt, gyt)  # [in, N]
        gw = torch.sparse.sampled_addmm(pattern, gyt.contiguous(), x)  # dY^T X on the pattern
        return gx, gw

    def fb():
        return fwd(), bwd()

    return {"fwd": fwd, "bwd": bwd, "fb": fb}


def bench_case(
    in_f: int,
    out_f: int,
    n: int,
    sparsity: float,
    device: torch.device,
    backends: list[str],
    reps: int,
    csr: bool,
    clock: str = "wall",
    threads: tuple[int, ...] = (0,),
    isas: tuple[str, ...] = (),
    stat: str = "min",
    dense_dtypes: tuple[str, ...] = ("fp32", "bf16"),
) -> list[dict]:
    """Time every method on one (shape, tokens, sparsity) case at each thread count (0: torch's default).

    ``isas``: CPU kernel variants the ``cpu`` backend runs as separate methods (``cpu-<isa>``); empty: the one
    the dispatch picks. ``stat``: ``min`` or ``median`` over the repeats. ``dense_dtypes``: the dense baselines
    (fp32 always: every ratio needs it).

    Returns one record per (method, thread count).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    num_diag, length = max(in_f, out_f), min(in_f, out_f)
    k = num_active_diagonals(in_f, out_f, sparsity)
    offsets = torch.randperm(num_diag, generator=gen)[:k].sort().values.to(device)
    values32 = (torch.randn(k, length, generator=gen) / math.sqrt(length)).to(device)
    x32 = torch.randn(n, in_f, generator=gen).to(device)
    gy32 = torch.randn(n, out_f, generator=gen).to(device)
    w32 = (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(device)

    methods: dict[str, dict] = {}
    dense = [("dense_fp32", torch.float32)] + [("dense_bf16", torch.bfloat16)] * ("bf16" in dense_dtypes)
    for label, dtype in dense:
        x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
        methods[label] = _phases(lambda x=x, w=w: F.linear(x, w), [x, w], gy32.to(dtype))
    if device.type == "cuda":
        x, w = x32.clone().requires_grad_(), w32.clone().requires_grad_()
        methods["dense_tf32"] = _phases(lambda x=x, w=w: F.linear(x, w), [x, w], gy32)
    if csr:
        methods["csr_fp32"] = _csr_phases(in_f, out_f, k * length, x32, gy32)
    for name in backends:
        backend = get_backend(name, device)
        for isa in isas if name == "cpu" and isas else (None,):
            label = name if isa is None else f"{name}-{isa}"
            for dtype in (torch.float32, torch.bfloat16):
                x, v = x32.to(dtype).requires_grad_(), values32.to(dtype).requires_grad_()
                fn = lambda b=backend, x=x, v=v: b.diag_linear(x, v, offsets, None, in_f, out_f)  # noqa: E731
                try:
                    with _cpu_isa(isa):
                        fn()
                except Exception as exc:
                    print(f"  skip {label} {dtype}: {type(exc).__name__}: {exc}")
                    continue
                phases = _phases(fn, [x, v], gy32.to(dtype))
                if isa is not None:  # the variant is read per op call, backward included
                    phases = {p: _with_isa(f, isa) for p, f in phases.items()}
                methods[f"{label}_{'fp32' if dtype == torch.float32 else 'bf16'}"] = phases

    achieved = 1.0 - k / num_diag
    records = []
    for t in threads:
        if t:
            torch.set_num_threads(t)
        # CPU time only measures elapsed time when a single thread does the work.
        timer = Timer(device, clock if device.type == "cuda" or torch.get_num_threads() == 1 else "wall")
        samples: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in methods}
        for m, phases in methods.items():  # warm-up (JIT builds, oneDNN primitive caches, autotuning)
            for p in PHASES:
                tf32 = m == "dense_tf32"
                torch.backends.cuda.matmul.allow_tf32 = tf32
                phases[p]()
        for _ in range(reps):
            for m, phases in methods.items():
                torch.backends.cuda.matmul.allow_tf32 = m == "dense_tf32"
                for p in PHASES:
                    samples[m][p].append(timer(phases[p], graph=p == "fwd"))
        torch.backends.cuda.matmul.allow_tf32 = False
        pick = min if stat == "min" else statistics.median
        best = {m: {p: pick(v) for p, v in per.items()} for m, per in samples.items()}
        for m, times in best.items():
            records.append(
                {
                    "in": in_f,
                    "out": out_f,
                    "tokens": n,
                    "sparsity": sparsity,
                    "achieved_sparsity": achieved,
                    "k": k,
                    "threads": torch.get_num_threads(),
                    "clock": timer.clock_name,
                    "method": m,
                    **{f"{p}_ms": times[p] for p in PHASES},
                    "fwd_cuda_graph": timer.graphed(methods[m]["fwd"]),
                }
            )
    return records


def add_ratios(records: list[dict]) -> None:
    """Speedups vs dense (same dtype and fp32), vs CSR, and fraction of the ceiling 1/(1-s), in place."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_case.setdefault((r["in"], r["out"], r["tokens"], r["sparsity"], r.get("threads")), {})[r["method"]] = r
    for case in by_case.values():
        for m, r in case.items():
            if m.startswith("dense"):
                continue
            same = "dense_bf16" if m.endswith("bf16") and "dense_bf16" in case else "dense_fp32"
            ceiling = 1.0 / (1.0 - r["achieved_sparsity"])
            for p in PHASES:
                r[f"{p}_vs_dense"] = case[same][f"{p}_ms"] / r[f"{p}_ms"]
                r[f"{p}_vs_dense_fp32"] = case["dense_fp32"][f"{p}_ms"] / r[f"{p}_ms"]
                if "csr_fp32" in case and m != "csr_fp32":
                    r[f"{p}_vs_csr"] = case["csr_fp32"][f"{p}_ms"] / r[f"{p}_ms"]
                r[f"{p}_of_ceiling"] = r[f"{p}_vs_dense"] / ceiling


def summarize(records: list[dict], shapes: dict, tokens: int, sparsities: tuple, threads: int | None = None) -> dict:
    """Geometric means over the shapes at ``tokens`` (and ``threads``) and the break-even sparsity per method.

    Per sparsity: the speedup vs dense of the same dtype (``fwd``/``bwd``/``fb``), vs CSR (``fwd_vs_csr``, ...)
    and the fraction of the ceiling ``1/(1-s)`` reached (``fwd_of_ceiling``, ...).
    """
    sizes = {v for v in shapes.values()}
    methods = sorted({r["method"] for r in records if not r["method"].startswith("dense")})
    out: dict = {}
    for m in methods:
        rows = [
            r
            for r in records
            if r["method"] == m
            and r["tokens"] == tokens
            and (r["in"], r["out"]) in sizes
            and (threads is None or r.get("threads") == threads)
        ]
        entry = {}
        for s in sparsities:
            sel = [r for r in rows if r["sparsity"] == s]
            if len(sel) == len(sizes):
                entry[str(s)] = {
                    f"{p}{suffix}": math.exp(sum(math.log(r[f"{p}{key}"]) for r in sel) / len(sel))
                    for p in PHASES
                    for suffix, key in (("", "_vs_dense"), ("_vs_csr", "_vs_csr"), ("_of_ceiling", "_of_ceiling"))
                    if all(f"{p}{key}" in r for r in sel)
                }
        for p in PHASES:  # lowest sparsity from which the geomean speedup stays >= 1 (linear interpolation)
            pts = [(float(s), v[p]) for s, v in entry.items() if isinstance(v, dict)]
            pts.sort()
            be = None
            for (s0, v0), (s1, v1) in itertools.pairwise(pts):
                if v0 < 1.0 <= v1:
                    be = s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0)
            if pts and pts[0][1] >= 1.0:
                be = f"<= {pts[0][0]}"
            entry[f"break_even_{p}"] = be
        out[m] = entry
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def machine_info() -> dict:
    """CPU model, the ISA flags the kernels and oneDNN care about, core count and the load average now."""
    flags: set[str] = set()
    vendor = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": cpu_name(),
        "vendor": vendor,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def print_table(records: list[dict]) -> None:
    head = f"{'shape':>11} {'N':>5} {'thr':>3} {'s':>5} {'method':>17} | {'fwd ms':>8} {'bwd ms':>8} {'fb ms':>8} |"
    head += f" {'fwd/dn':>6} {'fb/dn':>6} {'fwd/csr':>7} {'fb/csr':>6} {'ceil%':>5}"
    print(head)
    print("-" * len(head))
    for r in records:
        case = f"{r['in']:>5}x{r['out']:<5} {r['tokens']:>5} {r.get('threads', 0):>3} {r['sparsity']:>5}"
        line = f"{case} {r['method']:>17} |"
        line += f" {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} {r['fb_ms']:8.2f} |"
        if "fwd_vs_dense" in r:
            csr = f" {r.get('fwd_vs_csr', math.nan):7.2f} {r.get('fb_vs_csr', math.nan):6.2f}"
            line += f" {r['fwd_vs_dense']:6.2f} {r['fb_vs_dense']:6.2f}{csr} {100 * r['fwd_of_ceiling']:5.0f}"
        print(line)


def plot(records: list[dict], path: Path, tokens: tuple, backends: list[str], threads: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if threads is not None:
        records = [r for r in records if r.get("threads") == threads]
    fig, axes = plt.subplots(2, len(tokens), figsize=(6 * len(tokens), 8), squeeze=False)
    for col, n in enumerate(tokens):
        for row, p in enumerate(("fwd", "fb")):
            ax = axes[row][col]
            shown = [f"{b}_fp32" for b in backends] + [f"{b}_bf16" for b in backends] + ["csr_fp32"]
            for m in shown:
                for (in_f, out_f), color in zip(sorted({(r["in"], r["out"]) for r in records}), "bgrcmyk"):
                    pts = sorted(
                        (r["achieved_sparsity"], r[f"{p}_vs_dense"])
                        for r in records
                        if r["method"] == m and r["tokens"] == n and (r["in"], r["out"]) == (in_f, out_f)
                    )
                    if not pts:
                        continue
                    style = "-o" if m.endswith("fp32") and not m.startswith("csr") else ("--s" if "bf16" in m else ":x")
                    ax.plot(*zip(*pts), style, color=color, label=f"{m} {in_f}->{out_f}", markersize=3)
            s = [0.5 + 0.005 * i for i in range(97)]
            ax.plot(s, [1 / (1 - v) for v in s], "k-", lw=0.8, label="ceiling 1/(1-s)")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("sparsity")
            ax.set_ylabel(f"{p} speedup vs dense (same dtype)")
            ax.set_title(f"{p}, {n} tokens" + (f", {threads} thread(s)" if threads else ""))
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts, each timed")
    parser.add_argument("--reps", type=int, default=5, help="repeats per method (min is kept)")
    parser.add_argument("--quick", action="store_true", help="subset: 1,576 tokens, sparsities 0.7 0.9 0.95")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=None)
    parser.add_argument("--sparsities", nargs="*", type=float, default=None)
    parser.add_argument("--no-csr", action="store_true", help="skip torch.sparse CSR")
    parser.add_argument("--backends", nargs="*", default=None, help="kernel backends to time (default: diagonal ones)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference backend")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"], help="CPU timer (see Timer)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks/<device>)")
    parser.add_argument("--isa", nargs="*", default=[], help="CPU kernel variants to time (DYNADIAG_CPU_ISA values)")
    parser.add_argument(
        "--dense-dtypes",
        nargs="*",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="dense baselines (fp32 is always timed; bf16 on a CPU without AVX512-BF16/AMX is far slower than fp32)",
    )
    parser.add_argument("--stat", default="min", choices=["min", "median"], help="statistic over the repeats")
    args = parser.parse_args()

    device = torch.device(args.device)
    threads = tuple(args.threads or (torch.get_num_threads(),))
    machine = machine_info()
    tokens = tuple(args.tokens or ((1576,) if args.quick else TOKENS))
    sparsities = tuple(args.sparsities or ((0.7, 0.9, 0.95) if args.quick else SPARSITIES))
    shapes = {name: SHAPES[name] for name in args.shapes}
    # Diagonal kernels only: "dense" materialises W (and its method names would collide with the dense baselines),
    # grouped backends are for grouped layers (g >= 2); --backends picks explicitly.
    skip = ("reference", "dense")
    backends = args.backends or [b for b in available_backends(device) if b not in skip and not b.startswith("grouped")]
    if not args.no_reference:
        backends.append("reference")
    out = args.out or Path("docs/benchmarks") / device.type
    out.mkdir(parents=True, exist_ok=True)
    isa_info = cpu_isa_info(tuple(args.isa)) if device.type == "cpu" and "cpu" in backends else None
    print(f"device={device} threads={threads} backends={backends} torch={torch.__version__} machine={machine}")
    if isa_info is not None:
        print(f"cpu kernel variants: {isa_info}")

    records: list[dict] = []
    for name, (in_f, out_f) in shapes.items():
        for n in tokens:
            for s in sparsities:
                t0 = time.perf_counter()
                records += bench_case(
                    in_f,
                    out_f,
                    n,
                    s,
                    device,
                    backends,
                    args.reps,
                    not args.no_csr,
                    args.clock,
                    threads,
                    tuple(args.isa),
                    args.stat,
                    tuple(args.dense_dtypes),
                )
                print(f"  {name} {in_f}->{out_f} N={n} s={s}: {time.perf_counter() - t0:.1f}s", flush=True)
    add_ratios(records)
    print_table(records)
    summary = {
        f"threads{t}": {n: summarize(records, shapes, n, sparsities, t) for n in tokens} for t in sorted(set(threads))
    }
    for key, per_tokens in summary.items():
        for n, per_method in per_tokens.items():
            print(f"\n{key}: geometric mean over {list(shapes)} at {n} tokens (speedup vs dense, same dtype or fp32):")
            for m, entry in per_method.items():
                cells = [f"s={s}: fwd {v['fwd']:.2f} fb {v['fb']:.2f}" for s, v in entry.items() if isinstance(v, dict)]
                print(f"  {m:>14}: " + "; ".join(cells))
                print(f"  {'':>14}  break-even fwd {entry['break_even_fwd']}, fb {entry['break_even_fb']}")
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": machine,  # CPU model, ISA flags, load average at the start
        "threads": list(threads),
        "torch": torch.__version__,
        "reps": args.reps,
        "stat": args.stat,
        "clock": args.clock,
        "cpu_isa": isa_info,  # kernel variants timed, the CPU's own, dense caps, emulated or native
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "shapes": shapes,
        "backends": backends,
    }
    (out / "bench_kernels.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1)
    )
    shown = [b for b in backends if b != "reference"]
    if args.isa and "cpu" in shown:
        shown = [n for b in shown for n in ([f"cpu-{i}" for i in args.isa] if b == "cpu" else [b])]
    for t in sorted(set(threads)):
        plot(records, out / f"bench_kernels_t{t}.png", tokens, shown, t)
    print(f"wrote {out / 'bench_kernels.json'} and {out}/bench_kernels_t*.png")


if __name__ == "__main__":
    main()
