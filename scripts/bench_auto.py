"""Per-layer benchmark of ``backend=auto`` against dense ``nn.Linear``: is ``auto`` ever slower than dense?

For the four ViT-B layer shapes at 90 % sparsity (free, random offsets, as after training), 197 and 1,576 tokens,
fp32 and bf16 (module and activations in that dtype), times through the modules (their Python included):

- ``infer``: the forward under ``torch.no_grad``;
- ``train``: forward + backward with the values, the bias and the input requiring grad;

of ``nn.Linear`` (dense), a frozen ``DiagLinear`` with ``backend=auto`` (its first call measures and caches the
choice; that call is the warm-up, not timed) and, for comparison, ``backend=cpu`` (the diagonal kernels alone).
The three are interleaved within each repeat; the median over ``--reps`` repeats is kept, in the calling thread's
CPU time (1 thread: a loaded machine preempts long runs more than short ones, which skews the wall clock). Writes
``<out>/<label>.json`` and ``<out>/<label>.md``: the ratio dense / auto per case (>= 1: auto is faster), what
``auto`` chose and the ratio it measured, the CPU model, the kernel ISA variant and any cap on the dense side's.

    OMP_NUM_THREADS=1 python scripts/bench_auto.py --label native --out docs/benchmarks/cpu/auto
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 DYNADIAG_CPU_ISA=avx2 OMP_NUM_THREADS=1 \\
        python scripts/bench_auto.py --label avx2-emulated --out docs/benchmarks/cpu/auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynadiag import DiagLinear  # noqa: E402
from dynadiag.kernels import get_backend_status  # noqa: E402
from dynadiag.kernels.auto import cpu_isa, device_name  # noqa: E402

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(in_f: int, out_f: int, sparsity: float, dtype: torch.dtype) -> dict[str, nn.Module]:
    """``nn.Linear`` and frozen DiagLinears (random offsets) of one shape, in ``dtype``."""
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f).to(dtype)
    layers: dict[str, nn.Module] = {"dense": dense}
    backends = ["auto"] + (["cpu"] if get_backend_status("cpu", "cpu")[0] else [])
    for backend in backends:
        layer = DiagLinear(in_f, out_f, sparsity=sparsity, backend=backend)
        with torch.no_grad():
            layer.alpha.copy_(torch.randn(layer.alpha.shape, generator=torch.Generator().manual_seed(1)))
        layers[backend] = layer.freeze_().to(dtype)
    return layers


def step(module: nn.Module, x: torch.Tensor, phase: str) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        xg = x.detach().requires_grad_()
        module(xg).sum().backward()
        module.zero_grad(set_to_none=True)

    return infer if phase == "infer" else train


def time_case(layers: dict[str, nn.Module], x: torch.Tensor, phase: str, reps: int) -> dict[str, float]:
    """Median ms of each module's call, interleaved per repeat, after one warm-up call each."""
    calls = {name: step(m, x, phase) for name, m in layers.items()}
    for fn in calls.values():
        fn()  # auto measures (or reads its cache) here
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.thread_time()
            fn()
            samples[name].append((time.thread_time() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="file name of the results, e.g. native or avx2-emulated")
    parser.add_argument("--out", default="docs/benchmarks/cpu/auto")
    parser.add_argument("--tokens", type=int, nargs="*", default=[197, 1576])
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--layers", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--phases", nargs="*", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = {
        "cpu": device_name(torch.device("cpu")),
        "isa": cpu_isa(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit(),
        "sparsity": args.sparsity,
        "reps": args.reps,
        "clock": "thread CPU time, median",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    rows = []
    for dtype_name in args.dtypes:
        for layer_name in args.layers:
            layers = build(*SHAPES[layer_name], args.sparsity, DTYPES[dtype_name])
            for tokens in args.tokens:
                x = torch.randn(tokens, SHAPES[layer_name][0]).to(DTYPES[dtype_name])
                for phase in args.phases:
                    ms = time_case(layers, x, phase, args.reps)
                    auto = layers["auto"]
                    row = {"layer": layer_name, "tokens": tokens, "dtype": dtype_name, "phase": phase,
                           "ms": ms, "auto_vs_dense": ms["dense"] / ms["auto"],
                           "cpu_vs_dense": ms["dense"] / ms["cpu"] if "cpu" in ms else None,
                           "auto_kernel": auto.kernel, "auto_measured_ratio": auto.kernel_ratio}  # fmt: skip
                    rows.append(row)
                    print(
                        f"{layer_name:>4} {tokens:>5} {dtype_name} {phase:>5}: dense {ms['dense']:8.2f} ms  "
                        f"auto {ms['auto']:8.2f} ms ({row['auto_vs_dense']:.2f}x, {auto.kernel}, measured "
                        f"{auto.kernel_ratio or 0:.2f}x)"
                        + (f"  cpu {row['cpu_vs_dense']:.2f}x" if "cpu" in ms else ""),
                        flush=True,
                    )
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.label}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    (out / f"{args.label}.md").write_text(table(info, rows))
    worst = min(r["auto_vs_dense"] for r in rows)
    print(f"worst auto / dense: {worst:.2f}x ({len(rows)} cases); wrote {out / args.label}.{{json,md}}")


def table(info: dict, rows: list[dict]) -> str:
    lines = [
        f"# auto vs dense nn.Linear: {info['cpu']}, kernel ISA `{info['isa']}`, {info['threads']} thread(s)",
        "",
        f"Commit {info['commit']}, torch {info['torch']}, sparsity {info['sparsity']}, {info['reps']} interleaved "
        f"repeats, {info['clock']}; load average {' '.join(info['loadavg_start'])} -> {' '.join(info['loadavg_end'])}.",
        "Speed-up = dense ms / backend ms (>= 1: faster than dense). `auto` chose = its plan; measured = the ratio its "
        "own timing saw when it chose.",
        "",
        "| layer | tokens | dtype | phase | dense ms | auto ms | auto speed-up | auto chose | measured "
        "| cpu speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = f"{r['cpu_vs_dense']:.2f}x" if r["cpu_vs_dense"] else "-"
        measured = f"{r['auto_measured_ratio']:.2f}x" if r["auto_measured_ratio"] else "-"
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['dtype']} | {r['phase']} | {r['ms']['dense']:.2f} | "
            f"{r['ms']['auto']:.2f} | {r['auto_vs_dense']:.2f}x | {r['auto_kernel']} | {measured} | {cpu} |"
        )
    worst = min(rows, key=lambda r: r["auto_vs_dense"])
    lines += ["", f"Worst case: {worst['layer']} {worst['tokens']} {worst['dtype']} {worst['phase']}: "
              f"{worst['auto_vs_dense']:.2f}x dense."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
