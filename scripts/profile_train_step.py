"""Where a training step of the default run spends its CPU time: dense, sparse_dynadiag's soft phase, frozen.

Builds the real run (``configs/config.yaml`` plus overrides, through :mod:`composition`: data loader, model, method,
timm's AdamW, lr schedule, :class:`~dynadiag.trainer.Trainer`) and drives ``Trainer._train_step`` on the real
training batches, so every per-step cost of a run is in the measurement: the method's hooks, the optimizer, the
loss check, the timers. Variants:

- ``dense``: ``sparsifier=dense``;
- ``soft_c<c>``: ``sparse_dynadiag`` in its soft phase with ``K' = c * K`` random candidates per layer, held at
  ``--soft-step`` (a non-update step: temperature and hardness as in a run there);
- ``update_c<c>``: as ``soft_c<c>`` but every step is a candidate-update step (dense-gradient capture, drop/grow),
  which a run takes once every ``delta_t`` steps;
- ``frozen``: ``sparse_dynadiag`` after the freeze (``K`` diagonals per layer, sparse kernels);
- any of them with ``@override,override`` appended: that variant alone gets these Hydra overrides (A/B within one
  interleaved run, e.g. ``dense@optim.fused=null``).

Measurements, on one thread, in CPU time (``time.process_time``: a loaded machine disturbs it far less than the
wall clock); variants interleaved within each of ``--reps`` repeats of ``--steps`` steps, best repeat kept:

1. the step without the data loader (what the trainer's images/s times), and the loader's time on its own;
2. its parts: the method's hooks, ``optimizer.step``, the forward call, and loss + backward + the trainer's glue;
3. the diagonal (or dense) target layers alone: forward + backward of every target layer on its real input shape,
   through the module (its Python included) -- the rest of the step is what no diagonal kernel can speed up;
4. with ``--profile``: one ``torch.profiler`` pass, self time by op category (diagonal kernels, dense GEMMs,
   gather/index, sort/top-k, other ATen ops, Python/dispatch) and the top ops. The profiler reads the wall clock
   and adds a few microseconds per op: read it for shares, not totals.

    OMP_NUM_THREADS=1 python scripts/profile_train_step.py --variants dense soft_c3 soft_c1 frozen --profile \
        --out docs/results/sparse_dynadiag_study/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import composition as comp  # noqa: E402
from dynadiag.layers import DiagLinear  # noqa: E402
from dynadiag.loggers import NullLogger  # noqa: E402

PARTS = ("hooks", "optimizer", "forward", "loss+backward+glue")
CATEGORIES = ("diag kernels", "dense GEMM", "gather/index", "sort/topk", "other ATen", "Python/dispatch")
HOOKS = ("on_step_start", "on_after_backward", "on_after_optimizer_step", "will_freeze")
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # DynaDiag's default targets in a ViT block


class Clock:
    """CPU seconds per named part, accumulated while :attr:`on` (profiler ranges of the same names)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        with record_function(f"part/{name}"):
            t0 = time.process_time()
            try:
                yield
            finally:
                if self.on:
                    self.seconds[name] += time.process_time() - t0


def compose(overrides: list[str]):
    """The run's config (``configs/config.yaml`` with ``overrides``), as train.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=comp.CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class Variant:
    """A set-up trainer in the state ``name`` describes; :meth:`step` runs one training step on the next batch."""

    def __init__(self, spec: str, overrides: list[str], soft_step: int, run_dir: str) -> None:
        name, _, extra = spec.partition("@")  # e.g. "dense@optim.fused=null": this variant's own overrides
        overrides = [*overrides, *filter(None, extra.split(","))]
        self.name, self.clock = name, Clock()
        sparsifier = ["sparsifier=dense"] if name == "dense" else []
        cfg = compose(
            ["logger=local", "trainer.save_checkpoints=false", "trainer.progress=off", *sparsifier, *overrides]
        )
        comp.seed_everything(int(cfg.seed))
        data = comp.build_data(cfg.data, int(cfg.seed))
        model, method, _ = comp.build_sparse_model(cfg.model, cfg.sparsifier)
        trainer = comp.build_trainer(cfg, model, method, data, torch.device("cpu"), run_dir, NullLogger(), {}, {})
        trainer.setup()
        self.trainer, self.hold = trainer, None
        if name != "dense":
            if name == "frozen":
                trainer.step = method.freeze_step - 1  # this step ends with the freeze; the timed steps follow it
            else:
                trainer.step = soft_step
                if name.startswith("update_"):  # the next candidate-update step (dense-gradient capture, drop/grow)
                    while not method.schedule.is_update_step(trainer.step):
                        trainer.step += 1
                elif method.schedule.is_update_step(soft_step):
                    raise ValueError(f"--soft-step {soft_step} is an update step; pick another")
                self.hold = trainer.step  # held there: same temperature, hardness and candidate count every step
                set_candidate_density(method, float(name.rsplit("_c", 1)[1]), trainer.optimizer)
        self._batches: Iterator = iter(())
        self.data_seconds = 0.0
        if name == "frozen":
            self.step()  # the freeze step (it also evaluates before/after the freeze: not timed)
            assert all(m.is_frozen for _, m in method.layers)
        self._instrument()

    def step(self) -> None:
        trainer = self.trainer
        t0 = time.process_time()
        with record_function("part/data"):
            try:
                images, labels = next(self._batches)
            except StopIteration:
                trainer._start_epoch(_NoBar())
                self._batches = iter(trainer.data.train_loader)
                images, labels = next(self._batches)
        self.data_seconds += time.process_time() - t0
        t0 = time.process_time()
        trainer._train_step([(images, labels)])  # one micro-batch per step (accum_steps=1)
        if self.clock.on:
            self.clock.seconds["step"] += time.process_time() - t0
        trainer.step = self.hold if self.hold is not None else trainer.step + 1

    def _instrument(self) -> None:
        """Time the forward call, the optimizer step and the method's hooks (instance attributes wrap them)."""
        trainer, clock = self.trainer, self.clock
        model_call, optimizer_step = trainer.forward_model, trainer.optimizer.step

        def forward(*args: object) -> torch.Tensor:
            with clock.part("forward"):
                return model_call(*args)

        def step(*args: object, **kwargs: object) -> object:
            with clock.part("optimizer"):
                return optimizer_step(*args, **kwargs)

        trainer.forward_model, trainer.optimizer.step = forward, step
        for hook_name in HOOKS:
            hook = getattr(trainer.method, hook_name)

            def wrapped(*args: object, _hook=hook) -> object:
                with clock.part("hooks"):
                    return _hook(*args)

            setattr(trainer.method, hook_name, wrapped)

    def parts_ms(self, steps: int) -> dict[str, float]:
        """Per-step CPU ms of each part; the forward/optimizer/hook parts are subtracted from the whole step."""
        ms = {k: 1e3 * v / steps for k, v in self.clock.seconds.items()}
        out = {p: ms.get(p, 0.0) for p in PARTS[:3]}
        out["loss+backward+glue"] = ms.get("step", 0.0) - sum(out.values())
        return out


class _NoBar:
    def set_description(self, *_: object) -> None:
        pass


def set_candidate_density(method, density: float, optimizer: torch.optim.Optimizer) -> None:
    """Give every soft layer ``round(density * K)`` random candidates (same draw for every run of the script);
    ``optimizer`` follows (the compact layout's new ``V``; the stable layout changes rows in place, so with the
    default ``density_start=3`` its ``V`` keeps ``3K`` rows for every density up to 3)."""
    generator = torch.Generator().manual_seed(1)
    for _, layer in method.layers:
        count = min(layer.num_diagonals, max(layer.k, round(density * layer.k)))
        ids = torch.randperm(layer.num_diagonals, generator=generator)[:count]
        layer.set_candidates_(ids, optimizer=optimizer)


def target_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(TARGETS) and isinstance(m, nn.Linear | DiagLinear)]


def layers_ms(variant: Variant, reps: int, inner: int = 5) -> float:
    """CPU ms of forward + backward of every target layer, alone, on the input shape it sees in training."""
    trainer = variant.trainer
    shapes: dict[str, tuple[int, ...]] = {}
    layers = target_layers(trainer.model)

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in layers]
    variant.step()
    for handle in handles:
        handle.remove()
    total = 0.0
    for name, layer in layers:
        x = torch.randn(shapes[name], requires_grad=True)
        grad = torch.randn(*shapes[name][:-1], layer.out_features)
        tensors = [x, *layer.parameters()] + (
            [layer.alpha] if isinstance(getattr(layer, "alpha", None), torch.Tensor) else []
        )
        best = float("inf")
        for _ in range(reps):
            seconds = 0.0
            for _ in range(inner):
                for t in tensors:
                    t.grad = None  # as after the trainer's zero_grad(set_to_none=True)
                t0 = time.process_time()
                layer(x).backward(grad)
                seconds += time.process_time() - t0
            best = min(best, seconds / inner)
        total += best
    return 1e3 * total


def _category(name: str) -> str:
    if "dynadiag" in name and "Backward" not in name.split("dynadiag")[-1]:
        return "diag kernels"  # the custom ops, and the autograd wrapper that runs the forward kernel
    if name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"):
        return "dense GEMM"
    if name in ("aten::sort", "aten::topk", "aten::argsort"):
        return "sort/topk"
    gathers = ("aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_add_", "aten::gather")
    if name in gathers or name.startswith(("aten::scatter", "aten::index_select", "aten::nonzero")):
        return "gather/index"
    if name.startswith(("aten::", "prims::")):
        return "other ATen"
    return "Python/dispatch"  # ranges, autograd nodes, Optimizer.step: self time outside any ATen op


def profile_variant(variant: Variant, steps: int) -> dict[str, object]:
    """Profiler self time per step (ms) by op category, and the top ops."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            variant.step()
    categories = dict.fromkeys(CATEGORIES, 0.0)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name == "part/data" or (event.cpu_parent is not None and _root(event).name == "part/data"):
            continue  # the loader is outside the trainer's timing
        self_ms = event.self_cpu_time_total / 1e3 / steps
        categories[_category(event.name)] += self_ms
        ops[event.name] += self_ms
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:30])
    return {"self_ms_by_category": categories, "top_ops_self_ms": top}


def _root(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
    return event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["dense", "soft_c3", "soft_c1", "frozen", "update_c3"])
    parser.add_argument("--steps", type=int, default=10, help="steps per repeat (and per profile)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--soft-step", type=int, default=350, help="global step of the soft variants (not an update)")
    parser.add_argument("--profile", action="store_true", help="also run torch.profiler once per variant")
    parser.add_argument("--out", default=None, help="optional JSON path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run, e.g. sparsity=0.98")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # the wrapped optimizer.step (timing) hides the call from the lr scheduler's order check: the order is right
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        variants = {v: Variant(v, args.overrides, args.soft_step, run_dir) for v in args.variants}
        for variant in variants.values():
            for _ in range(3):
                variant.step()  # warm-up: kernel builds, allocator, optimizer state
        best: dict[str, tuple[float, dict[str, float], float]] = {}
        per_rep: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.reps):
            for name, variant in variants.items():
                variant.clock.seconds.clear()
                variant.clock.on, variant.data_seconds = True, 0.0
                for _ in range(args.steps):
                    variant.step()
                variant.clock.on = False
                parts = variant.parts_ms(args.steps)
                step_ms = sum(parts.values())
                per_rep[name].append(step_ms)
                if name not in best or step_ms < best[name][0]:
                    best[name] = (step_ms, parts, 1e3 * variant.data_seconds / args.steps)
        for name, variant in variants.items():
            step_ms, parts, data_ms = best[name]
            linear = layers_ms(variant, args.reps)
            rows[name] = {"ms_per_step": step_ms, "loader_ms": data_ms, "parts_ms": parts, "target_layers_ms": linear}
            rows[name]["median_ms_per_step"] = sorted(per_rep[name])[len(per_rep[name]) // 2]
        load = os.getloadavg()[0]
        ref = rows["dense"]["ms_per_step"] if "dense" in rows else rows[args.variants[0]]["ms_per_step"]
        print(
            f"1 thread, CPU ms per training step without the loader (best of {args.reps} x {args.steps}), "
            f"load {load:.1f}"
        )
        print(
            f"{'variant':<10}{'step':>8}{'vs dense':>9}{'layers':>8}{'rest':>8} | " + "".join(f"{p:>20}" for p in PARTS)
        )
        for name, row in rows.items():
            rest = row["ms_per_step"] - row["target_layers_ms"]
            row["vs_dense"] = ref / row["ms_per_step"]
            print(
                f"{name:<10}{row['ms_per_step']:8.1f}{row['vs_dense']:8.2f}x (median {row['median_ms_per_step']:.1f})"
                f"{row['target_layers_ms']:8.1f}{rest:8.1f} | "
                + "".join(f"{row['parts_ms'][p]:20.1f}" for p in PARTS)
                + f"   (loader {row['loader_ms']:.1f})"
            )
        if args.profile:
            for name, variant in variants.items():
                rows[name]["profile"] = result = profile_variant(variant, args.steps)
                cats = result["self_ms_by_category"]
                print(
                    f"\n== {name}: profiler self ms/step by category: "
                    + ", ".join(f"{c} {v:.1f}" for c, v in cats.items())
                )
                print(
                    "   top ops: " + ", ".join(f"{k} {v:.2f}" for k, v in list(result["top_ops_self_ms"].items())[:16])
                )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"overrides": args.overrides, "load": load, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
