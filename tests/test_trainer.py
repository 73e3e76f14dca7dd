"""The training loop with real components (synthetic data, a 2-block ViT, DynaDiag): hook order, files, resume."""

from __future__ import annotations

import functools
import json
import os
import re

import pytest
import timm.optim
import torch

from dynadiag.checkpoint import CheckpointError, load_checkpoint
from dynadiag.data import DataConfig, build_loaders
from dynadiag.layers import DiagLinear
from dynadiag.loggers import build_logger
from dynadiag.lr_schedule import LRSchedule
from dynadiag.methods.base import SparseMethod
from dynadiag.methods.dynadiag import DynaDiagMethod
from dynadiag.models import create_model
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.trainer import Trainer, TrainerConfig

DATA = dict(name="synthetic", img_size=8, in_chans=3, num_classes=4, patch_size=4, batch_size=16, num_train=64)


def make_trainer(run_dir, method=None, epochs=3, max_steps=None, seed=0, embed_dim=16, **trainer_kw) -> Trainer:
    torch.manual_seed(seed)
    data = build_loaders(DataConfig(**DATA, num_val=32, eval_batch_size=32), seed=seed)  # 4 steps per epoch
    model = create_model("vit_tiny_patch16_224", 4, 3, 8, 4, embed_dim=embed_dim, depth=2, num_heads=2)
    method = (
        method
        if method is not None
        else DynaDiagMethod(DiagSparsifyConfig(0.8), TemperatureSchedule(freeze_epoch=1, per_epoch=True))
    )
    method.apply_(model)  # the trainer takes a model its method has already made sparse (composition.py)
    config = TrainerConfig(
        epochs=epochs,
        max_steps=max_steps,
        log_every_steps=2,
        throughput_warmup_steps=1,
        inference_iters=1,
        final_inference_iters=1,
        progress="off",
        **trainer_kw,
    )
    optimizer = functools.partial(timm.optim.create_optimizer_v2, opt="adamw", lr=3e-3, weight_decay=0.05)
    logger = build_logger(str(run_dir), ["jsonl"])
    run_config = {"model": {"name": "vit_nano_test"}, "sparsifier": {"sparsity": 0.8}, "data": dict(DATA)}
    return Trainer(
        model,
        method,
        optimizer,
        LRSchedule(warmup_epochs=1),
        data,
        config,
        torch.device("cpu"),
        str(run_dir),
        logger=logger,
        run_config=run_config,
        info={"run_name": "test"},
    )


class RecordingMethod(SparseMethod):
    """A real (dense) method that records the hook calls it receives."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def apply_(self, model):
        self.calls.append(("apply", -1))

    def on_step_start(self, step, model):
        self.calls.append(("start", step))
        return {"probe": float(step)}

    def on_after_backward(self, step, model, optimizer):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)  # backward has run
        self.calls.append(("backward", step))
        return {}

    def on_after_optimizer_step(self, step, model, optimizer):
        self.calls.append(("optimizer", step))
        return {}


def test_hook_order_and_step_count(tmp_path):
    method = RecordingMethod()
    trainer = make_trainer(tmp_path, method, epochs=2)
    summary = trainer.fit()
    expected = [("apply", -1)]
    for step in range(8):
        expected += [("start", step), ("backward", step), ("optimizer", step)]
    assert method.calls == expected
    assert summary["steps"] == 8 and method.steps_per_epoch == 4 and method.total_steps == 8


def test_smoke_run_writes_metrics_summary_checkpoints_and_freezes(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    summary = trainer.fit()
    trainer.logger.finish()
    layers = [m for m in trainer.model.modules() if isinstance(m, DiagLinear)]
    assert layers and all(layer.is_frozen for layer in layers)
    # the optimizer no longer holds alpha and holds the compact [K, D] values
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(layer.V) in held and layer.V.shape[0] == layer.k for layer in layers)
    assert not any(isinstance(layer.alpha, torch.nn.Parameter) for layer in layers)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(r.keys() for r in records if "train/loss" in r))
    assert {"train/loss", "train/lr", "train/temperature"} <= train_keys
    evals = [r for r in records if "val/top1" in r]
    assert len(evals) == 3
    for key in ("val/loss", "val/top5", "val/top1_best", "sparsity/effective", "throughput/infer_images_per_s"):
        assert key in evals[-1]
    assert any(k.startswith("sparsity/k/blocks.0.attn.qkv") for k in evals[-1])
    # frozen: K * D of P * D per diagonal layer (width 16, MLP 64): qkv 10 x 16 of 768, proj 4 x 16 of 256,
    # fc1 and fc2 13 x 16 of 1024 each, per block; the patch embedding (768) and the head (64) stay dense
    target = 1 - 2 * (10 + 4 + 13 + 13) * 16 / (2 * 3072)
    assert evals[-1]["sparsity/target_layers"] == pytest.approx(target, rel=1e-12)
    assert evals[-1]["sparsity/effective"] == pytest.approx(1 - (2 * 40 * 16 + 768 + 64) / 6976, rel=1e-12)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 12
    assert on_disk["val_top1_best"] == max(r["val/top1"] for r in evals)
    assert summary["train_images_per_s"] > 0 and summary["infer_images_per_s"] > 0
    assert summary["sparsity_target_layers"] == pytest.approx(target, rel=1e-12)
    # Each frozen layer's kernel choice is in the summary, with auto's measured ratio ("dense x8 (1.00x dense)":
    # at width 16 the kernels do not beat dense GEMMs).
    assert all(layer.kernel for layer in layers)
    counts = re.findall(r"(\S+) x(\d+) \((\d+\.\d+)(?:-\d+\.\d+)?x dense\)", summary["kernels"])
    assert sum(int(n) for _, n, _ in counts) == len(layers) and {k for k, _, _ in counts} == {m.kernel for m in layers}
    assert all(float(r) >= 1.0 for _, _, r in counts)  # auto never runs what it measured slower than dense
    for name in ("last.pt", "best.pt"):
        assert (tmp_path / "checkpoints" / name).is_file()


def test_max_steps_caps_but_schedules_follow_epochs(tmp_path):
    trainer = make_trainer(tmp_path, epochs=5, max_steps=3)
    summary = trainer.fit()
    assert summary["steps"] == 3 and trainer.planned_steps == 20
    assert trainer.method.freeze_step == 4  # freeze_epoch=1 of the planned run, not of the capped one


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    full = make_trainer(tmp_path_factory.mktemp("full"), epochs=3)
    return full, full.fit()


@pytest.mark.parametrize("stop_at", [2, 6])  # before the freeze (mid-epoch) and after it
def test_resume_matches_uninterrupted_run(tmp_path, stop_at, uninterrupted):
    full, full_summary = uninterrupted
    first = make_trainer(tmp_path / "part", epochs=3, max_steps=stop_at)
    first.fit()
    assert load_checkpoint(tmp_path / "part")["step"] == stop_at
    resumed = make_trainer(tmp_path / "part", epochs=3)
    summary = resumed.fit(resume=str(tmp_path / "part" / "checkpoints" / "last.pt"))
    assert summary["steps"] == full_summary["steps"] == 12
    assert summary["val_loss_final"] == full_summary["val_loss_final"]  # bitwise on CPU
    # the throughput covers the whole run, not only the resumed part (same timed steps as without the stop)
    assert resumed.overall_timer.images == full.overall_timer.images > 0
    assert resumed.overall_timer.cpu_seconds > first.overall_timer.cpu_seconds > 0
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key  # same weights, same frozen offsets


def test_resume_rejects_incompatible_config(tmp_path):
    make_trainer(tmp_path, epochs=1, max_steps=2).fit()
    other = make_trainer(tmp_path / "b", epochs=1)
    other.run_config = {**other.run_config, "sparsifier": {"sparsity": 0.5}}
    with pytest.raises(ValueError, match=r"incompatible config: sparsifier\.sparsity"):
        other.fit(resume=str(tmp_path))
    wider = make_trainer(tmp_path / "c", epochs=1, embed_dim=24)
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        wider.fit(resume=str(tmp_path))


class NaNAtStep(SparseMethod):
    """Corrupts one weight at a chosen step, as a diverging run would."""

    def __init__(self, step: int):
        super().__init__()
        self.bad_step = step

    def on_step_start(self, step, model):
        if step == self.bad_step:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))
        return {}


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    trainer = make_trainer(tmp_path, NaNAtStep(3), epochs=2)
    with pytest.raises(FloatingPointError, match="at step 3"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/nonfinite_loss") == "nan" and r["step"] == 3 for r in records)


def test_nonfinite_skip_keeps_counting(tmp_path):
    trainer = make_trainer(tmp_path, NaNAtStep(7), epochs=2, nonfinite="skip", save_checkpoints=False)
    assert trainer.fit()["steps"] == 8
    assert not os.path.exists(tmp_path / "checkpoints")


def test_freeze_epoch_line_reports_a_training_rate(tmp_path, capsys):
    """The evaluation right after the freeze has no timed step of the new topology yet: it shows the run's average
    rate, marked as such, instead of 0.0 img/s."""
    make_trainer(tmp_path, epochs=2).fit()  # freeze after step 4 = the end of epoch 1, evaluated right then
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and "(run average)" in lines[0] and "(run average)" not in lines[1]
    for line in lines:
        rate = float(line.split("train")[1].split("img/s")[0])
        assert rate > 0, line
