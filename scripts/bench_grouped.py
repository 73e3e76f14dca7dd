"""Speed vs group size: grouped diagonal kernels against dense bf16 ``F.linear`` (oneDNN: AMX where present).

Layers: the four ViT-B shapes at 1,576 tokens (8 images x 197) and one sparsity (default 90 %). For each group
size ``g`` the kept offsets are ``ceil(K/g)`` random groups of ``g`` consecutive offsets (what a trained grouped
layer holds), and these are timed in the same run, interleaved within each repeat (minimum over repeats kept):

- ``dense``: ``F.linear`` with a dense weight (the sparsity-independent baseline), bf16 (and fp32 for context);
- ``cpu``: the project's single-diagonal kernels on the same offsets (they ignore the grouping);
- ``grouped_cpu``: the band-tile kernels (AMX tiles for bf16 where the CPU has AMX, else oneDNN brgemm).

Phases: ``fwd`` (inference: under ``no_grad``, where ``grouped_cpu`` reuses the packed tiles of the frozen weights),
``fwd_nc`` (``grouped_cpu`` only: the same forward with that cache off, i.e. what a training forward pays) and ``fb``
(forward + grad of the input + grad of the diagonal values / the weight). Model: timm
ViT-B/16 at 224 px, batch 8, bf16 autocast inference, dense vs the same model with grouped layers frozen at the
sparsity (``--model``). One thread on ``--clock process`` (CPU time of the process: a loaded machine disturbs it
far less than the wall clock). Writes ``<out>/<name>.json`` (CPU model, ISA flags, load average) and
``<out>/<name>.png`` (``--name``, default ``bench_grouped``).

    python scripts/bench_grouped.py --clock process --model --out docs/results/grouped
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynadiag import DiagLinear, DiagSparsifyConfig, sparsify_
from dynadiag import groups as DG
from dynadiag.kernels import get_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import machine_info

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
GROUPS = (1, 2, 8, 32, 64)


def grouped_offsets(in_f: int, out_f: int, sparsity: float, group: int, gen: torch.Generator) -> torch.Tensor:
    """``ceil(K/g)`` random groups of ``g`` consecutive offsets (sorted diagonal ids)."""
    num_diag = max(in_f, out_f)
    kept = DG.num_active_groups(in_f, out_f, sparsity, group)
    groups = torch.randperm(DG.num_groups(num_diag, group), generator=gen)[:kept]
    return DG.group_offsets(groups, num_diag, group)


def tile_work(in_f: int, out_f: int, offsets: torch.Tensor) -> dict:
    """The AMX plan's work (csrc/grouped/grouped_amx.cpp): one 32 x 32 x 32 k-step per (output block, input column
    block) pair that holds a kept weight. Returns the k-steps per 32 tokens, the share of the tiles' multiply-adds
    that are kept weights, and the speedup over dense at equal tile efficiency (dense: every pair)."""
    d = min(in_f, out_f)
    t = torch.arange(d)
    if out_f >= in_f:  # tall: weight (k, t) sits at column t, row (t + p_k) mod out
        rows, cols = (t[None, :] + offsets[:, None]) % out_f, t[None, :].expand(offsets.numel(), d)
    else:  # wide: row t, column (t + p_k) mod in
        rows, cols = t[None, :].expand(offsets.numel(), d), (t[None, :] + offsets[:, None]) % in_f
    ncb = -(-in_f // 32)
    steps = int(torch.unique((rows // 32) * ncb + cols // 32).numel())
    dense_steps = ncb * -(-out_f // 32)
    return {
        "ksteps_per_32_tokens": steps,
        "useful_mac_share": offsets.numel() * d / (steps * 32 * 32),
        "tile_ceiling_vs_dense": dense_steps / steps,
    }


def _phases(forward, leaves: list[torch.Tensor], grad_y: torch.Tensor, uncached: bool = False) -> dict:
    def fwd():
        with torch.no_grad():
            forward()

    def fwd_nc():
        from dynadiag.kernels import grouped_cpu

        grouped_cpu.CACHE_FROZEN = False
        try:
            fwd()
        finally:
            grouped_cpu.CACHE_FROZEN = True

    def fb():
        y = forward()
        torch.autograd.grad(y, leaves, grad_y)

    return {"fwd": fwd, "fb": fb, **({"fwd_nc": fwd_nc} if uncached else {})}


def bench_layers(args, clock) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    records = []
    for shape, (in_f, out_f) in SHAPES.items():
        if shape not in args.shapes:
            continue
        x32 = torch.randn(args.tokens, in_f, generator=gen)
        gy32 = torch.randn(args.tokens, out_f, generator=gen)
        dense_w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        methods: dict[str, dict] = {}
        for dtype in args.dense_dtypes:
            dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
            x = x32.to(dt).requires_grad_()
            w = dense_w.to(dt).requires_grad_()
            methods[f"dense_{dtype}"] = {"g": 0, **_phases(lambda x=x, w=w: F.linear(x, w), [x, w], gy32.to(dt))}
        for g in args.groups:
            offsets = grouped_offsets(in_f, out_f, args.sparsity, g, gen)
            values = (torch.randn(offsets.numel(), min(in_f, out_f), generator=gen) / in_f**0.5).bfloat16()
            for name in args.backends:
                backend = get_backend(name, "cpu")
                x = x32.bfloat16().requires_grad_()
                v = values.clone().requires_grad_()

                def fwd(backend=backend, x=x, v=v, offsets=offsets, in_f=in_f, out_f=out_f):
                    return backend.diag_linear(x, v, offsets, None, in_f, out_f)

                phases = _phases(fwd, [x, v], gy32.bfloat16(), uncached=name == "grouped_cpu")
                stats = tile_work(in_f, out_f, offsets) if name == "grouped_cpu" else {}
                methods[f"{name}_g{g}"] = {"g": g, "k": offsets.numel(), "stats": stats, **phases}
        all_phases = ("fwd", "fwd_nc", "fb")
        times = {m: {p: float("inf") for p in all_phases if p in methods[m]} for m in methods}
        for m in methods.values():  # warm up (builds, oneDNN kernel caches)
            for phase in all_phases:
                if phase in m:
                    m[phase]()
        for _ in range(args.reps):
            for name, m in methods.items():
                for phase in times[name]:
                    t0 = clock()
                    m[phase]()
                    times[name][phase] = min(times[name][phase], (clock() - t0) * 1e3)
        base = times["dense_bf16"]
        for name, m in methods.items():
            rec = {"shape": shape, "in": in_f, "out": out_f, "tokens": args.tokens, "sparsity": args.sparsity}
            rec.update({"method": name, "g": m["g"], "k": m.get("k"), "fwd_ms": times[name]["fwd"]})
            rec.update({"fb_ms": times[name]["fb"], "fwd_vs_dense_bf16": base["fwd"] / times[name]["fwd"]})
            rec["fb_vs_dense_bf16"] = base["fb"] / times[name]["fb"]
            rec.update(m.get("stats", {}))
            nc = ""
            if "fwd_nc" in times[name]:
                rec["fwd_nc_ms"] = times[name]["fwd_nc"]
                rec["fwd_nc_vs_dense_bf16"] = base["fwd"] / times[name]["fwd_nc"]
                nc = f"  fwd no cache {rec['fwd_nc_ms']:6.2f} ms ({rec['fwd_nc_vs_dense_bf16']:5.2f}x)"
            if "ksteps_per_32_tokens" in rec:
                nc += f"  tiles: useful {rec['useful_mac_share']:.2f}, ceiling {rec['tile_ceiling_vs_dense']:.2f}x"
            records.append(rec)
            print(
                f"{shape:>5} {name:>16} k={rec['k']!s:>5} fwd {rec['fwd_ms']:8.2f} ms "
                f"({rec['fwd_vs_dense_bf16']:5.2f}x)  fb {rec['fb_ms']:8.2f} ms ({rec['fb_vs_dense_bf16']:5.2f}x){nc}",
                flush=True,
            )
    return records


def bench_model(args, clock) -> list[dict]:
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("vit_base_patch16_224", num_classes=1000).eval()
    images = torch.randn(args.tokens // 197, 3, 224, 224)
    models = {"dense": dense}
    for g in args.model_groups:
        for name in args.backends:
            model = copy.deepcopy(dense)
            sparsify_(model, DiagSparsifyConfig(sparsity=args.sparsity, backend=name, group=g, permute=True))
            gen = torch.Generator().manual_seed(g)
            for layer in model.modules():
                if isinstance(layer, DiagLinear):
                    layer.alpha.data.copy_(torch.rand(layer.num_groups, generator=gen))
                    layer.freeze_()
            models[f"{name}_g{g}"] = model.eval()

    # "autocast": fp32 weights under bf16 autocast (as scripts/bench_model.py; dense pays a weight cast per call);
    # "bf16": weights converted to bf16 once (model.bfloat16()), what a bf16 deployment runs.
    variants = {f"{n}|autocast": m for n, m in models.items()}
    variants.update({f"{n}|bf16": copy.deepcopy(m).bfloat16() for n, m in models.items()})
    bf16_images = images.bfloat16()

    def infer(key, model):
        with torch.inference_mode():
            if key.endswith("|bf16"):
                model(bf16_images)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(images)

    times = {k: float("inf") for k in variants}
    for k, m in variants.items():
        infer(k, m)
    for _ in range(args.model_reps):
        for k, m in variants.items():
            t0 = clock()
            infer(k, m)
            times[k] = min(times[k], clock() - t0)
    records = []
    for k, t in times.items():
        name, mode = k.split("|")
        rec = {"model": "vit_base_patch16_224", "method": name, "mode": mode, "batch": images.shape[0]}
        rec.update({"sparsity": args.sparsity, "seconds": t, "images_per_s": images.shape[0] / t})
        rec["vs_dense"] = times[f"dense|{mode}"] / t
        records.append(rec)
        print(
            f"ViT-B/16 {mode:>8} inference {name:>16}: {rec['images_per_s']:7.2f} img/s ({rec['vs_dense']:.2f}x dense)"
        )
    return records


def plot(records: list[dict], path: Path, backends: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, phase in zip(axes, ("fwd", "fb"), strict=True):
        for shape in shapes:
            for name, style in zip(backends, ("-o", "--s"), strict=False):
                rs = [r for r in records if r["shape"] == shape and r["method"].startswith(name + "_g")]
                ax.plot([r["g"] for r in rs], [r[f"{phase}_vs_dense_bf16"] for r in rs], style, label=f"{shape} {name}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size g")
        ax.set_title({"fwd": "forward", "fb": "forward + backward"}[phase])
    axes[0].set_ylabel("speed vs dense bf16 F.linear (x)")
    axes[1].legend(fontsize=7)
    s = records[0]["sparsity"]
    fig.suptitle(f"ViT-B layers, {records[0]['tokens']} tokens, {s:.0%} sparsity, bf16, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tokens", type=int, default=1576)
    parser.add_argument("--groups", type=int, nargs="*", default=list(GROUPS))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="*", default=["cpu", "grouped_cpu"])
    parser.add_argument("--dense-dtypes", nargs="*", default=["bf16", "fp32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", action="store_true", help="also time ViT-B/16 bf16 inference")
    parser.add_argument("--model-groups", type=int, nargs="*", default=[32])
    parser.add_argument("--model-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="process", choices=["wall", "process"])
    parser.add_argument("--out", type=Path, default=Path("docs/results/grouped"))
    parser.add_argument("--name", default="bench_grouped", help="file stem of the JSON and PNG written to --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    amx = None
    if "grouped_cpu" in args.backends:
        get_backend("grouped_cpu", "cpu")
        amx = bool(torch.ops.dynadiag_grouped.use_amx(True))
    info = {**machine_info(), "threads": args.threads, "clock": args.clock, "grouped_cpu_amx": amx}
    print(json.dumps(info))
    layers = bench_layers(args, clock) if args.shapes and args.groups else []
    model = bench_model(args, clock) if args.model else []
    info["load_average_end"] = machine_info()["load_average"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "layers": layers, "model": model},
            indent=1,
        )
    )
    if layers:
        plot(layers, args.out / f"{args.name}.png", args.backends)
    print(f"wrote {args.out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
