"""End-to-end throughput: timm ViT-S/16 and ViT-B/16 at 224 px, dense vs DynaDiag frozen at each sparsity.

Every block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` become frozen ``DiagLinear`` layers
(``dynadiag.sparsify_`` then ``layer.freeze_()``); patch embedding and head stay dense. Before freezing, each
layer's ``alpha`` is randomised so the kept offsets are scattered like learned ones (a uniform alpha would
keep the first K diagonals, an unrealistically cache-friendly pattern). Measures inference images/s
(``inference_mode``) and the time of one training step (forward, cross-entropy, backward, AdamW step), in fp32
and in bf16 autocast, interleaving dense and sparse models within each repeat and keeping the best repeat. With
several ``--threads`` each is timed in the same run (1 thread on ``--clock process``: CPU time of the process, which
a loaded machine disturbs far less; more threads on the wall clock). The JSON records the CPU model, its ISA flags
and the load average.

    python scripts/bench_model.py --device cpu --threads 1 2 --clock process --out docs/benchmarks/cpu/bench_model.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from dynadiag import DiagLinear, DiagSparsifyConfig, sparsify_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import machine_info

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def frozen_sparse_copy(dense: torch.nn.Module, sparsity: float, backend: str, seed: int = 0) -> torch.nn.Module:
    """A copy of ``dense`` whose ViT linear layers are frozen DiagLinear layers with scattered offsets."""
    model = copy.deepcopy(dense)
    sparsify_(model, DiagSparsifyConfig(sparsity=sparsity, backend=backend))
    gen = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, DiagLinear):
            layer.alpha.data.copy_(torch.rand(layer.num_diagonals, generator=gen))
            layer.freeze_()
    return model.to(next(dense.parameters()).device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_steps(model: torch.nn.Module, batch: int, device: torch.device, dtype: str) -> dict:
    """Closures for one inference forward and one training step of ``model``."""
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def infer():
        model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            model(images)

    def train():
        model.train()
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"infer": infer, "train": train}


def timed(fn, device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes: CPU time of the process with ``clock="process"`` (1 thread only)."""
    now = time.process_time if clock == "process" else time.perf_counter
    _sync(device)
    t0 = now()
    fn()
    _sync(device)
    return now() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts, each timed")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"], help="1-thread CPU timer")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--sparsities", nargs="*", type=float, default=list(SPARSITIES))
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8, help="images per step (8 x 197 = 1,576 tokens)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="kernel backend of the frozen layers")
    parser.add_argument("--quick", action="store_true", help="ViT-S only, sparsities 0.9, fp32, 2 repeats")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default docs/benchmarks/<device>/...)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sparsities, args.dtypes, args.reps = ["vit_small_patch16_224"], [0.9], ["fp32"], 2

    device = torch.device(args.device)
    threads = tuple(args.threads or (torch.get_num_threads(),))
    machine = machine_info()
    out = args.out or Path("docs/benchmarks") / device.type / "bench_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device={device} threads={threads} batch={args.batch} backend={args.backend} machine={machine}")

    results = []
    for name in args.models:
        dense = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
        variants = {"dense": dense}
        for s in args.sparsities:
            variants[f"diag_{s}"] = frozen_sparse_copy(dense, s, args.backend)
        backend_used = {
            k: next((m.backend for m in v.modules() if isinstance(m, DiagLinear)), None) for k, v in variants.items()
        }
        for dtype, n_threads in ((d, t) for d in args.dtypes for t in threads):
            torch.set_num_threads(n_threads)
            clock = args.clock if device.type == "cpu" and n_threads == 1 else "wall"
            steps = {k: make_steps(v, args.batch, device, dtype) for k, v in variants.items()}
            best = {k: {"infer": math.inf, "train": math.inf} for k in variants}
            for k in variants:  # warm-up: JIT builds, oneDNN primitives, optimizer state
                for phase in ("infer", "train"):
                    steps[k][phase]()
            for _ in range(args.reps):
                for k in variants:
                    for phase in ("infer", "train"):
                        best[k][phase] = min(best[k][phase], timed(steps[k][phase], device, clock))
            base = best["dense"]
            for k, t in best.items():
                row = {
                    "model": name,
                    "variant": k,
                    "sparsity": 0.0 if k == "dense" else float(k.split("_")[1]),
                    "dtype": dtype,
                    "threads": n_threads,
                    "clock": clock,
                    "backend": backend_used[k],
                    "batch": args.batch,
                    "infer_images_per_s": args.batch / t["infer"],
                    "infer_ms": 1e3 * t["infer"],
                    "train_step_ms": 1e3 * t["train"],
                    "infer_speedup": base["infer"] / t["infer"],
                    "train_speedup": base["train"] / t["train"],
                }
                results.append(row)
                print(
                    f"{name:>22} {dtype} {n_threads}t {k:>9}: infer {row['infer_images_per_s']:7.1f} img/s "
                    f"({row['infer_speedup']:.2f}x)  train step {row['train_step_ms']:8.1f} ms "
                    f"({row['train_speedup']:.2f}x)",
                    flush=True,
                )
    meta = {
        "device": str(device),
        "machine": machine,  # CPU model, ISA flags, load average at the start
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": list(threads),
        "clock": args.clock,
        "torch": torch.__version__,
        "reps": args.reps,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
