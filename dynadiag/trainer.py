"""The training loop: any :class:`~dynadiag.methods.base.SparseMethod`, checkpoints, metrics and throughput.

Per optimizer step, in this order (the contract of :mod:`dynadiag.methods.base`)::

    method.on_step_start          (e.g. set the temperature)
    forward under autocast -> loss -> backward   (``accum_steps`` micro-batches, gradients summed)
    method.on_after_backward      (dense gradients visible)
    unscale + clip -> optimizer.step -> lr_scheduler.step
    method.on_after_optimizer_step  (freeze, prune/regrow; may set ``method.topology_changed``)
    EMA: re-synced to a changed topology, then updated (``ema_decay > 0``)

The trainer owns the global step; the method's schedules are pure functions of it, so a checkpoint with the
step, the model (topology included), the optimizer, the method state and the RNG states resumes exactly.
Rank 0 alone logs and writes files (:mod:`dynadiag.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dynadiag import distributed as dist_utils
from dynadiag.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_rng_,
)
from dynadiag.data import DataBundle
from dynadiag.ema import SparseEMA
from dynadiag.evaluate import evaluate
from dynadiag.loggers import Logger, NullLogger
from dynadiag.lr_schedule import LRSchedule, TimmLRSchedule, build_lr_scheduler
from dynadiag.methods.base import SparseMethod
from dynadiag.preemption import StopSignals, requeue_slurm_job
from dynadiag.selection_stats import SelectionMonitor
from dynadiag.sparsity import kernel_summary, sparsity_report, sparsity_stats
from dynadiag.throughput import StepTimer, measure_inference_throughput

__all__ = ["Trainer", "TrainerConfig", "format_summary"]


@dataclass
class TrainerConfig:
    """Run length, logging cadence, numerics and checkpointing.

    Attributes:
        epochs: planned epochs; every schedule (lr, temperature, freeze) is laid out over these.
        max_steps: hard cap on optimizer steps (smoke runs); schedules still follow ``epochs``.
        eval_every_epochs: validate every this many epochs (and always at the end).
        log_every_steps: write ``train/*`` metrics every this many steps.
        grad_clip: max global gradient norm (``None`` or 0: no clipping).
        amp: ``off``, ``bf16`` or ``fp16`` (the latter with a gradient scaler).
        compile: wrap the model in ``torch.compile`` (rebuilt when the topology changes).
        compile_backend: ``torch.compile`` backend: ``inductor`` (generated kernels), or e.g. ``aot_eager`` to
            check that the model traces without graph breaks at no compile cost.
        save_checkpoints: write ``checkpoints/last.pt`` and ``best.pt``.
        ckpt_every_steps: also write ``last.pt`` every this many steps (0: only at evaluations).
        progress: ``auto`` (bars only on a terminal), ``on`` or ``off``.
        throughput_warmup_steps: untimed steps at the start of each phase (and after a topology change).
        inference_iters: timed forward passes for inference throughput at each evaluation (0: use the timing of
            the evaluation's own forward passes, which costs nothing extra).
        final_inference_iters: timed forward passes at the final evaluation (the summary's number; also runs
            for at least one second).
        nonfinite: what to do on a NaN/inf loss: ``stop`` (raise) or ``skip`` (drop that update).
        eval_max_batches: limit validation batches (smoke runs).
        accum_steps: micro-batches per optimizer step (gradient accumulation): each step sums the gradients of
            ``accum_steps`` loader batches, each loss divided by ``accum_steps``; an epoch is
            ``len(loader) // accum_steps`` steps and every schedule counts optimizer steps.
        ema_decay: keep an exponential moving average of the weights with this decay per optimizer step (0: off);
            it follows topology changes (:mod:`dynadiag.ema`) and is evaluated next to the model (``val_ema/*``).
        ema_warmup: timm's EMA decay warm-up (shorter averaging horizon over the first steps).
    """

    epochs: int = 40
    max_steps: int | None = None
    eval_every_epochs: int = 1
    log_every_steps: int = 20
    grad_clip: float | None = None
    amp: str = "off"
    compile: bool = False
    compile_backend: str = "inductor"
    save_checkpoints: bool = True
    ckpt_every_steps: int = 0
    progress: str = "auto"
    throughput_warmup_steps: int = 5
    inference_iters: int = 0
    final_inference_iters: int = 20
    nonfinite: str = "stop"
    eval_max_batches: int | None = None
    accum_steps: int = 1
    ema_decay: float = 0.0
    ema_warmup: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"trainer.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"trainer.amp must be off, bf16 or fp16, got {self.amp!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"trainer.nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"trainer.progress must be auto, on or off, got {self.progress!r}")
        if int(self.accum_steps) != self.accum_steps or self.accum_steps < 1:
            raise ValueError(f"trainer.accum_steps must be an integer >= 1, got {self.accum_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        self.accum_steps = int(self.accum_steps)
        self.eval_every_epochs = max(1, int(self.eval_every_epochs))
        self.log_every_steps = max(1, int(self.log_every_steps))


class _LossMeter:
    """Mean training loss since the last log, over every rank's steps (a skipped non-finite step adds nothing)."""

    def __init__(self, device: torch.device) -> None:
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.total += loss  # on the device: no synchronisation per step
            self.count += 1

    def mean_and_reset(self) -> float:
        """All-reduced mean (a collective: every rank calls it at the same step)."""
        totals = dist_utils.all_reduce_sum(torch.stack([self.total, self.total.new_tensor(self.count)]))
        self.total.zero_()
        self.count = 0
        return (totals[0] / totals[1].clamp_min(1)).item()


class Trainer:
    """Trains ``model`` with ``method``; :meth:`fit` returns the run summary.

    Args:
        model: the model, already made sparse by ``method.apply_`` (see ``composition.build_sparse_model``).
        method: the sparse-training method that was applied to ``model`` (``SparseMethod()`` for dense training).
        optimizer_factory: builds the optimizer from the (sparsified, possibly resumed) model.
        lr_schedule: warm-up/decay of the learning rate (per optimizer step).
        data: loaders, Mixup and loss from :func:`dynadiag.data.build_loaders`.
        config: loop settings.
        device: where to train.
        run_dir: the run directory (``checkpoints/``, ``summary.json``, ``metrics.jsonl`` live here).
        logger: metric sink (rank 0); :class:`~dynadiag.loggers.NullLogger` elsewhere.
        run_config: the resolved run configuration, stored in checkpoints so ``eval.py`` can rebuild the model.
        info: extra fields for the summary (run name, model name, target sparsity, seed, ...).
        seed: the run's seed; under DDP, ranks other than 0 re-seed their generators with
            :func:`~dynadiag.distributed.rank_seed` after the model is built, so each rank draws its own augmentation
            and dropout (``None``: leave the generators alone).
    """

    def __init__(
        self,
        model: nn.Module,
        method: SparseMethod,
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
        lr_schedule: LRSchedule | TimmLRSchedule,
        data: DataBundle,
        config: TrainerConfig,
        device: torch.device,
        run_dir: str,
        logger: Logger | None = None,
        run_config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.model, self.method, self.data, self.cfg = model, method, data, config
        self.seed = seed
        self.optimizer_factory, self.lr_schedule = optimizer_factory, lr_schedule
        self.device, self.run_dir = device, run_dir
        self.logger = logger or NullLogger()
        self.run_config, self.info = run_config or {}, dict(info or {})
        self.steps_per_epoch = len(data.train_loader) // config.accum_steps
        if len(data.train_loader) < 1:
            raise ValueError("the training loader yields no full batch: lower data.batch_size")
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"trainer.accum_steps={config.accum_steps} exceeds the {len(data.train_loader)} batches of an epoch: "
                "lower trainer.accum_steps or data.batch_size"
            )
        self.planned_steps = config.epochs * self.steps_per_epoch
        self.total_steps = min(self.planned_steps, config.max_steps or self.planned_steps)
        self.step, self.best_top1, self.best_ema_top1 = 0, -math.inf, -math.inf
        self.ema: SparseEMA | None = None
        self.last_eval: dict[str, Any] = {}
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.train_timer = StepTimer(device, config.throughput_warmup_steps)  # current topology only
        self.overall_timer = StepTimer(device, config.throughput_warmup_steps)  # whole run
        self.infer_images_per_s = 0.0
        #: selection quality of the diagonal layers (top-K share, live diagonals, churn, freeze drop)
        self.selection = SelectionMonitor()

    # ----------------------------------------------------------------- setup
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the training forward pass runs through: DDP across ranks, then ``torch.compile``.

        Compiling the DDP wrapper (not the reverse) lets Dynamo split the graph at DDP's gradient buckets, so
        all-reduces overlap the backward pass. Also sets ``self.eval_model`` (the model without DDP, compiled if
        asked): evaluation and throughput timing run a rank-local number of forward passes outside autograd,
        which must not enter DDP's collectives.
        """

        def compile_(module: nn.Module) -> nn.Module:
            return torch.compile(module, backend=self.cfg.compile_backend)

        self.eval_model = compile_(model) if self.cfg.compile else model
        self.ddp_model = None
        if not dist_utils.is_dist():
            return self.eval_model
        # broadcast_buffers=False: buffers (diagonal offsets, masks) are kept identical by the methods themselves;
        # re-broadcasting them every forward would cost a collective per step for nothing.
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = self.ddp_model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return compile_(ddp) if self.cfg.compile else ddp

    def setup(self, resume: str | None = None) -> None:
        """Bind schedules to the run length, move to device, build the optimizer, maybe resume."""
        self.method.bind(self.steps_per_epoch, self.planned_steps)
        self.model.to(self.device)
        state = None
        if resume:
            state = load_checkpoint(resume, map_location=self.device)
            self._check_compatible(state, resume)
            # Load the model before building the optimizer: a frozen checkpoint changes the parameter shapes.
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as exc:
                detail = " ".join(str(exc).split())[:300]
                raise CheckpointError(f"checkpoint {resume} does not fit this run's model: {detail}") from None
            self.model.to(self.device)
        self.optimizer = self.optimizer_factory(self.model)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, self.lr_schedule, self.steps_per_epoch, self.planned_steps
        )
        if self.cfg.ema_decay:  # from the (resumed) model, so its structure is the model's
            self.ema = SparseEMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.scaler.load_state_dict(state.get("scaler") or {})
            self.method.load_state_dict(state.get("method") or {})
            self.selection.load_state_dict(state.get("selection") or {})
            for name, timer in (("train", self.train_timer), ("overall", self.overall_timer)):
                timer.load_state_dict((state.get("timers") or {}).get(name) or {})
            self.step, self.best_top1 = int(state["step"]), float(state.get("best_metric", -math.inf))
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
                self.best_ema_top1 = float(state.get("best_ema_metric", -math.inf))
            self.last_eval = dict(state.get("last_eval") or {})
            self._print(f"resumed from {resume} at step {self.step} (epoch {self.step // self.steps_per_epoch})")
        self._seed_rank_streams(state)
        self.forward_model = self.wrap_model(self.model)

    def _seed_rank_streams(self, state: dict[str, Any] | None) -> None:
        """Give this rank its own generator states: the checkpoint's (``rng_ranks`` when it was written by as many
        ranks), else a fresh stream per rank (rank 0 keeps its stream, so one process behaves as it always did)."""
        rank, ranks = dist_utils.rank(), (state or {}).get("rng_ranks")
        if state is not None and ranks is not None and len(ranks) == dist_utils.world_size():
            restore_rng_state(ranks[rank])
            return
        if state is not None:
            restore_rng_state(state["rng"])
        if rank > 0 and self.seed is not None:  # at the resumed step, so a re-launch with other ranks differs
            seed_rng_(dist_utils.rank_seed(self.seed + self.step, rank))

    def _check_compatible(self, state: dict[str, Any], path: str) -> None:
        old, new = state.get("config") or {}, self.run_config

        def node(config: dict[str, Any], path: str) -> dict[str, Any]:
            for key in path.split("."):
                config = config.get(key) if isinstance(config, dict) else None
            return config if isinstance(config, dict) else {}

        for key in ("model", "sparsifier", "sparsifier.config", "data"):
            a, b = node(old, key), node(new, key)
            for field in ("_target_", "name", "sparsity", "num_classes", "img_size", "patch_size", "in_chans"):
                if field in a and field in b and a[field] != b[field]:
                    raise ValueError(
                        f"checkpoint {path} is from an incompatible config: {key}.{field}={a[field]!r} there, "
                        f"{b[field]!r} here"
                    )
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ValueError(
                f"checkpoint {path} has {state['steps_per_epoch']} steps per epoch, this run {self.steps_per_epoch}: "
                "resume with the same data.batch_size and number of ranks"
            )

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` and return the summary (also written to ``summary.json``).

        On SIGTERM / SIGUSR1 (:mod:`dynadiag.preemption`) it saves ``last.pt`` after the current step (after that
        step's evaluation, if one is due) and returns early with ``stopped_by`` in the summary.
        """
        with StopSignals() as self._signals:
            return self._fit(resume)

    def _fit(self, resume: str | None) -> dict[str, Any]:
        """The training loop: one pass over the data per epoch, logging, checkpoints and evaluation on schedule."""
        t_start = time.perf_counter()
        self.setup(resume)
        bar = self._progress_bar()
        losses = _LossMeter(self.device)
        stop = False
        while self.step < self.total_steps and not stop:
            epoch = self._start_epoch(bar)
            for batches in self._update_batches():
                loss, metrics = self._train_step(batches)
                losses.add(loss)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every_steps == 0 or self.step == self.total_steps:
                    self._log_train(losses.mean_and_reset(), metrics, epoch, bar)
                if self.cfg.ckpt_every_steps and self.step % self.cfg.ckpt_every_steps == 0:
                    self.save("last.pt")
                stop = self._signals.requested(self.device)  # once per step on every rank (a collective)
                if stop or self.step >= self.total_steps or self.step % self.steps_per_epoch == 0:
                    break
            self._evaluate_if_due(epoch)
        bar.close()
        if stop and self.step < self.total_steps:
            return self._stop(self._signals.name)
        return self._finish(time.perf_counter() - t_start)

    # ------------------------------------------------------- loop helpers
    def _update_batches(self):  # -> Iterator[list[tuple[images, labels]]]
        """The loader's batches in groups of ``accum_steps``, one group per optimizer step (a short tail is dropped)."""
        group = []
        for batch in self.data.train_loader:
            group.append(batch)
            if len(group) == self.cfg.accum_steps:
                yield group
                group = []

    def _progress_bar(self) -> tqdm:
        show = self.cfg.progress == "on" or (self.cfg.progress == "auto" and sys.stderr.isatty())
        show = show and dist_utils.is_main_process()
        return tqdm(total=self.total_steps, initial=self.step, disable=not show, desc="train", dynamic_ncols=True)

    def _start_epoch(self, bar: tqdm) -> int:
        """Position the sampler at ``self.step`` (mid-epoch after a resume); returns the 0-based epoch."""
        epoch, done_in_epoch = divmod(self.step, self.steps_per_epoch)
        self.data.train_sampler.set_epoch(epoch)
        self.data.train_sampler.skip(done_in_epoch * self.cfg.accum_steps * self.data.train_loader.batch_size)
        bar.set_description(f"epoch {epoch + 1}/{self.cfg.epochs}")
        self.model.train()
        return epoch

    def _log_train(self, loss: float, metrics: dict[str, float], epoch: int, bar: tqdm) -> None:
        record = {"train/loss": loss, "train/lr": self.optimizer.param_groups[0]["lr"], "epoch": epoch}
        record |= {f"train/{k}": v for k, v in metrics.items()}
        if self.train_timer.images:
            record["throughput/train_images_per_s"] = self.train_timer.images_per_second
        self.logger.log(record, self.step)
        bar.set_postfix(loss=f"{loss:.3f}")

    def _evaluate_if_due(self, epoch: int) -> None:
        """Evaluate (and checkpoint) at the end of every ``eval_every_epochs``-th epoch and at the end of the run."""
        epoch_done = self.step % self.steps_per_epoch == 0
        finished = self.step >= self.total_steps
        if finished or (epoch_done and (self.step // self.steps_per_epoch) % self.cfg.eval_every_epochs == 0):
            self._evaluate_and_checkpoint(epoch + (1 if epoch_done else 0), final=finished)

    def _finish(self, wall_seconds: float) -> dict[str, Any]:
        """The summary of a completed run, checked across ranks, written to ``summary.json`` and the logger."""
        summary = self._summary(wall_seconds)
        summary |= self._evaluate_test()
        report = sparsity_report(self.model)
        if any(layer.kernel for layer in report.layers):  # frozen layers ran: show each one's kernel choice
            self._print(str(report))
        if dist_utils.is_dist():
            # Every rank must end with the weights and topology rank 0 saved; anything else is a bug worth seeing.
            summary["world_size"] = dist_utils.world_size()
            # BatchNorm running statistics are rank-local (buffers are not broadcast); everything else must agree.
            state = self.model.state_dict()
            kept = [
                v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
            ]
            summary["ranks_in_sync"] = dist_utils.ranks_agree(kept)
            if not summary["ranks_in_sync"]:
                self._print("warning: the ranks ended with different weights or sparsity patterns")
        if dist_utils.is_main_process():
            with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as fh:
                json.dump(summary, fh, indent=2)
            self.logger.log_summary(summary)
        return summary

    def _evaluate_test(self) -> dict[str, float]:
        """The held-out test set, once, on the final model (``test_*`` keys; empty when the data has no test set).

        Nothing in the run reads these numbers (checkpoints and best-model choice follow the validation split)."""
        if self.data.test_loader is None:
            return {}
        result = evaluate(
            self.eval_model, self.data.test_loader, self.device, self.autocast(), self.cfg.eval_max_batches
        )
        record = {f"test_{k}": result[k] for k in ("top1", "top5", "loss")} | {"test_images": result["count"]}
        self.logger.log({f"test/{k}": result[k] for k in ("loss", "top1", "top5")}, self.step)
        self._print(f"test (held out, final model): top1 {result['top1']:.2f} on {result['count']} images")
        return record

    def _stop(self, signal_name: str) -> dict[str, Any]:
        """Checkpoint at this step boundary after a stop signal; SIGUSR1 under plain Slurm also requeues the job."""
        if self.cfg.save_checkpoints:
            self.save("last.pt")
        where = f"step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})"
        saved = "checkpoints/last.pt saved" if self.cfg.save_checkpoints else "no checkpoint (save_checkpoints=false)"
        self._print(f"stopped by {signal_name} at {where}: {saved}; run the same command again to resume")
        requeued = signal_name == "SIGUSR1" and requeue_slurm_job()
        if requeued:
            self._print("requeued the Slurm job (scontrol requeue)")
        self.logger.log({"stopped_by_signal": 1.0}, self.step)
        return {**self.info, "steps": self.step, "stopped_by": signal_name, "requeued": requeued}

    def _train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor | None, dict]:
        """One optimizer step on ``batches`` (``accum_steps`` micro-batches); returns the mean loss and metrics."""
        step = self.step
        metrics = dict(self.method.on_step_start(step, self.model))
        freezing = self.method.will_freeze(step, self.model)  # this step ends with the freeze of the selection
        self.optimizer.zero_grad(set_to_none=True)
        total, images_seen = None, 0
        for index, (images, labels) in enumerate(batches):
            images, labels = self._prepare(images, labels)
            if index == 0:  # the first batch's transfer and Mixup stay outside the timed step
                for timer in (self.train_timer, self.overall_timer):
                    timer.start()
            # Under DDP only the last micro-batch's backward all-reduces: the others accumulate locally.
            last = index == len(batches) - 1
            sync = nullcontext() if last or self.ddp_model is None else self.ddp_model.no_sync()
            with sync:
                loss = self._micro_batch_loss(images, labels, step)
                if loss is None:  # non-finite and trainer.nonfinite=skip: drop the whole update
                    self.optimizer.zero_grad(set_to_none=True)
                    self.lr_scheduler.step()  # skip the update but keep every schedule on the global step
                    return None, metrics
                self.scaler.scale(loss if len(batches) == 1 else loss / len(batches)).backward()
            total = loss.detach() if total is None else total + loss.detach()
            images_seen += images.shape[0]
        metrics |= self.method.on_after_backward(step, self.model, self.optimizer)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        # The accuracy and selection just before the freeze: after this step's update, before the method's hook
        # freezes, so the freeze drop is the freeze's own effect (the probe's time is left out of the timers).
        before = self._freeze_probe() if freezing else None
        metrics |= self.method.on_after_optimizer_step(step, self.model, self.optimizer)
        if self.ema is not None:
            if self.method.topology_changed:
                self.ema.resync_(self.model)  # new parameters: carry the averages over to the new structure
            self.ema.update(self.model, step + 1)
        for timer in (self.train_timer, self.overall_timer):
            timer.stop(images_seen * dist_utils.world_size())  # ranks step in lockstep: global images/s
        if self.method.topology_changed:
            # New parameters (e.g. frozen compact V): rebuild wrappers, time the new compute path afresh.
            self.method.topology_changed = False
            self.forward_model = self.wrap_model(self.model)
            self.train_timer.reset()
        if before is not None:
            after = self._freeze_probe()
            freeze = self.selection.record_freeze(before[0], after[0], before[1], step + 1)
            metrics |= freeze
            self.logger.log(freeze, step + 1)
            self._print(
                f"freeze after step {step + 1}: top1 {before[0]:.2f} -> {after[0]:.2f} "
                f"(drop {freeze['selection/freeze_drop']:+.2f} pp), top-K share before "
                f"{before[1].get('selection/topk_share', float('nan')):.3f}"
            )
        return (total if len(batches) == 1 else total / len(batches)), metrics

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, through Mixup/CutMix when the data has it."""
        images = images.to(self.device, non_blocking=True)  # [B, C, H, W]
        labels = labels.to(self.device, non_blocking=True)  # [B]
        if self.data.mixup_fn is not None:
            images, labels = self.data.mixup_fn(images, labels)  # labels -> [B, num_classes] soft targets
        return images, labels

    def _micro_batch_loss(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor | None:
        """Forward one micro-batch under autocast; ``None`` when the loss is non-finite and ``nonfinite=skip``."""
        with self.autocast():
            logits = self.forward_model(images)  # [B, num_classes]
            loss = self.data.train_loss(logits.float(), labels)
        # Every rank takes the same decision (a NaN on one rank would otherwise leave the others waiting in backward)
        local_bad = not torch.isfinite(loss).item()
        if dist_utils.any_rank(local_bad, self.device):
            value = loss.item() if local_bad else float("nan")
            self.logger.log({"train/nonfinite_loss": value}, step)
            if self.cfg.nonfinite == "stop":
                where = f"({value})" if local_bad else "on another rank"
                raise FloatingPointError(f"non-finite loss {where} at step {step}; stopping")
            return None
        return loss

    def _freeze_probe(self) -> tuple[float, dict[str, float]]:
        """Validation top-1 and selection numbers now, without touching the RNG streams training uses."""
        devices = [self.device] if self.device.type == "cuda" else []
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=devices):
            result = evaluate(
                self.eval_model, self.data.val_loader, self.device, self.autocast(), self.cfg.eval_max_batches
            )
        observed = self.selection.observe(self.model, update_previous=False)
        for timer in (self.train_timer, self.overall_timer):
            timer.exclude(time.perf_counter() - t0, time.process_time() - c0)
        return result["top1"], observed

    # ------------------------------------------------------- eval and files
    def _evaluate_and_checkpoint(self, epoch: int, final: bool = False) -> None:
        result = evaluate(
            self.eval_model, self.data.val_loader, self.device, self.autocast(), self.cfg.eval_max_batches
        )
        iters = self.cfg.final_inference_iters if final else self.cfg.inference_iters
        if iters > 0:  # a dedicated measurement on one validation batch, after warm-up
            images = next(iter(self.data.val_loader))[0].to(self.device)
            self.infer_images_per_s = measure_inference_throughput(
                self.eval_model, images, iters=iters, min_seconds=1.0 if final else 0.0, autocast=self.autocast()
            )
        else:  # free: the timed forward passes of the evaluation itself
            self.infer_images_per_s = result["images_per_s"]
        improved = result["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, result["top1"])
        stats = sparsity_stats(self.model)
        record = {f"val/{k}": result[k] for k in ("loss", "top1", "top5")}
        record |= {"val/top1_best": self.best_top1, "epoch": epoch}
        record |= {"sparsity/effective": stats["effective"], "sparsity/target_layers": stats["target"]}
        record |= {f"sparsity/k/{name}": k for name, k in stats["layers"].items()}
        record["throughput/infer_images_per_s"] = self.infer_images_per_s
        record |= self._evaluate_ema()
        selection = self.selection.observe(self.model)
        record |= selection
        if self.train_timer.images:
            record["throughput/train_images_per_s"] = self.train_timer.images_per_second
        self.logger.log(record, self.step)
        self.last_eval = {**result, "epoch": epoch, "step": self.step}
        if "val_ema/top1" in record:
            self.last_eval["ema_top1"] = record["val_ema/top1"]
        self._print(
            f"epoch {self.step / self.steps_per_epoch:6.2f}/{self.cfg.epochs} step {self.step:>6} | "
            f"val loss {result['loss']:.4f} "
            f"top1 {result['top1']:6.2f} (best {self.best_top1:6.2f}) | sparsity {stats['effective']:.3f} | "
            f"train {self._train_rate_text()}, infer {self.infer_images_per_s:8.1f} img/s"
            + (f" | ema top1 {record['val_ema/top1']:6.2f}" if "val_ema/top1" in record else "")
            + self._selection_text(selection)
        )
        if self.cfg.save_checkpoints:
            self.save("last.pt")
            if improved:
                self.save("best.pt")

    def _evaluate_ema(self) -> dict[str, float]:
        """``val_ema/{loss,top1,top5,top1_best}`` of the weight average (nothing when the EMA is off)."""
        if self.ema is None:
            return {}
        self.ema.sync_runtime_(self.model)
        result = evaluate(
            self.ema.module, self.data.val_loader, self.device, self.autocast(), self.cfg.eval_max_batches
        )
        self.best_ema_top1 = max(self.best_ema_top1, result["top1"])
        return {f"val_ema/{k}": result[k] for k in ("loss", "top1", "top5")} | {"val_ema/top1_best": self.best_ema_top1}

    @staticmethod
    def _selection_text(record: dict[str, float]) -> str:
        """`` | top-K share 0.153, live/K 8.4, churn 0.12`` while some diagonal layer is still soft, else ``""``."""
        if record.get("selection/frozen_fraction", 1.0) >= 1.0:
            return ""
        text = f" | top-K share {record['selection/topk_share']:.3f}, live/K {record['selection/live_over_k']:.2f}"
        if "selection/churn" in record:
            text += f", churn {record['selection/churn']:.3f}"
        return text

    def _train_rate_text(self) -> str:
        """Training images/s of the current topology; right after a topology change (the freeze) no step of it has
        been timed yet, so the whole run's rate is shown, marked as such (not 0.0)."""
        if self.train_timer.images:
            return f"{self.train_timer.images_per_second:8.1f} img/s"
        return f"{self.overall_timer.images_per_second:8.1f} img/s (run average)"

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (see :mod:`dynadiag.checkpoint`)."""
        state = self._base_checkpoint_state()
        if self.ema is not None:
            state |= {"ema": self.ema.state_dict(), "best_ema_metric": self.best_ema_top1}
        return state

    def _base_checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "selection": self.selection.state_dict(),
            # the throughput so far: the summary of a resumed run covers the whole run (wall and CPU time)
            "timers": {"train": self.train_timer.state_dict(), "overall": self.overall_timer.state_dict()},
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "best_metric": self.best_top1,
            "last_eval": self.last_eval,
            "rng": capture_rng_state(),
            "config": self.run_config,
        }

    def save(self, name: str) -> str | None:
        """Write ``checkpoints/<name>`` atomically (rank 0 writes; every rank calls this, at the same points, to
        hand in its generator states).

        Raises:
            CheckpointError: the write failed (e.g. disk full); the previous file at that path is intact.
        """
        rng_ranks = dist_utils.all_gather_object(capture_rng_state())  # a collective under DDP
        if not dist_utils.is_main_process():
            return None
        path = os.path.join(self.run_dir, "checkpoints", name)
        state = self.checkpoint_state()
        if len(rng_ranks) > 1:
            state["rng_ranks"] = rng_ranks
        try:
            return save_checkpoint(path, state)
        except OSError as exc:
            raise CheckpointError(
                f"could not write checkpoint {path} ({exc.strerror or exc}); the previous one there is intact"
            ) from exc

    def _summary(self, wall_seconds: float) -> dict[str, Any]:
        stats = sparsity_stats(self.model)
        train_ips = self.train_timer.images_per_second or self.overall_timer.images_per_second
        return {
            **self.info,
            "method": getattr(self.method, "name", type(self.method).__name__),
            "epochs": self.cfg.epochs,
            "steps": self.step,
            "val_top1_best": self.best_top1,
            "val_top1_final": self.last_eval.get("top1"),
            "val_top5_final": self.last_eval.get("top5"),
            "val_loss_final": self.last_eval.get("loss"),
            "params": stats["params"],
            "nnz": stats["nnz"],
            "dense_weights": stats["dense"],
            "sparsity_effective": stats["effective"],
            "sparsity_target_layers": stats["target"],
            "train_images_per_s": train_ips,
            "train_images_per_s_overall": self.overall_timer.images_per_second,
            **self._cpu_rates(),
            **self.selection.summary(),
            "infer_images_per_s": self.infer_images_per_s,
            "wall_time_s": wall_seconds,
            "device": str(self.device),
            # What computed each frozen diagonal layer last (backend, or auto's per-op plan on CUDA).
            "kernels": kernel_summary(self.model),
            **self._ema_summary(),
        }

    def _ema_summary(self) -> dict[str, float]:
        if self.ema is None:
            return {}
        return {"val_ema_top1_best": self.best_ema_top1, "val_ema_top1_final": self.last_eval.get("ema_top1")}

    def _cpu_rates(self) -> dict[str, float]:
        """Training images per CPU-second (final topology, whole run) on a CPU device: the numbers to compare runs
        made on a loaded machine with (the wall clock of a 1-thread run stretches with the load, its CPU time far
        less). Absent on accelerators, where the host's CPU time says little about the step."""
        if self.device.type != "cpu":
            return {}
        final = self.train_timer if self.train_timer.images else self.overall_timer
        return {
            "train_images_per_cpu_s": final.images_per_cpu_second,
            "train_images_per_cpu_s_overall": self.overall_timer.images_per_cpu_second,
        }

    def _print(self, message: str) -> None:
        if dist_utils.is_main_process():
            print(message, flush=True)


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column text table of the summary."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, float):
            text = f"{value:,.4f}" if abs(value) < 1 else f"{value:,.2f}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])
