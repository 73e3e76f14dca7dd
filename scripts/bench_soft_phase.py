"""CPU time of one training step of the default model: dense, the paper's soft phase, sparse_dynadiag's soft phase
at several candidate densities, and the frozen model.

The default run's model (``model=vit_mini`` on digits: timm ViT width 192, depth 6, 16 tokens, batch 64). Each
variant times forward, cross-entropy, backward and an AdamW step (and, for sparse_dynadiag, its own alpha step) on
one thread with ``time.process_time`` (CPU time of the process: a loaded machine disturbs it far less than the wall
clock), interleaving the variants within each repeat and keeping each variant's best repeat.

    OMP_NUM_THREADS=1 python scripts/bench_soft_phase.py --sparsity 0.9 --steps 10 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.methods import DynaDiagMethod, SparseDynaDiagMethod
from dynadiag.methods.dynadiag import freeze_all_
from dynadiag.models import create_model
from dynadiag.sparsify import DiagSparsifyConfig


def build(variant: str, sparsity: float, density: float):
    """``(model, step_fn)`` for one variant."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 10, 1, 16, 4, depth=6)
    method = None
    if variant == "paper_soft":
        method = DynaDiagMethod(DiagSparsifyConfig(sparsity, backend="auto"))
        method.apply_(model)
        for m in model.modules():
            if hasattr(m, "temperature"):
                m.temperature = 1.0
    elif variant.startswith("sparse_soft") or variant == "frozen":
        method = SparseDynaDiagMethod(DiagSparsifyConfig(sparsity, backend="auto"), density_start=max(1.0, density))
        method.apply_(model)
        method.bind(steps_per_epoch=100, total_steps=1000)
        for _, layer in method.layers:
            assert isinstance(layer, CandidateDiagLinear)
            count = min(layer.num_diagonals, round(density * layer.k))
            layer.set_candidates_(torch.randperm(layer.num_diagonals)[:count])
            layer.hardness, layer.temperature = 0.5, 0.5
        if variant == "frozen":
            freeze_all_(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))

    def step() -> None:
        if method is not None and variant != "paper_soft":
            method.on_step_start(1, model)  # sets temperature/hardness, clears alpha grads
            for _, layer in method.layers:
                layer.hardness = 0.5
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if method is not None and variant.startswith("sparse_soft"):
            method._alpha_step(optimizer)

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--densities", type=float, nargs="*", default=[3.0, 2.0, 1.5, 1.0], help="K'/K")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="optional JSON path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = ["dense", "paper_soft", *[f"sparse_soft_c{d:g}" for d in args.densities], "frozen"]
    built = {}
    for v in variants:
        density = float(v.rsplit("_c", 1)[1]) if v.startswith("sparse_soft") else 1.0
        built[v] = build(v, args.sparsity, density)
        for _ in range(2):
            built[v][1]()  # warm-up (kernel builds, allocator)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.reps):
        for v in variants:
            t0 = time.process_time()
            for _ in range(args.steps):
                built[v][1]()
            best[v] = min(best[v], (time.process_time() - t0) / args.steps)
    rows = {
        v: {"ms_per_step": 1e3 * best[v], "images_per_cpu_s": 64 / best[v], "vs_dense": best["dense"] / best[v]}
        for v in variants
    }
    load = os.getloadavg()[0]
    print(f"sparsity {args.sparsity}, 1 thread, CPU time, best of {args.reps} x {args.steps} steps, load {load:.1f}")
    for v, r in rows.items():
        line = f"{v:<18} {r['ms_per_step']:8.1f} ms/step {r['images_per_cpu_s']:8.1f} img/CPU-s"
        line += f" {r['vs_dense']:5.2f}x dense"
        print(line)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"sparsity": args.sparsity, "rows": rows, "load": os.getloadavg()[0]}, fh, indent=2)


if __name__ == "__main__":
    main()
