"""The trainer's timm-style options: gradient accumulation, EMA of the weights, layer-wise lr decay, timm schedules."""

from __future__ import annotations

import functools
import json

import pytest
import timm.optim
import torch
from timm.scheduler import CosineLRScheduler

from dynadiag.candidate_layer import CandidateDiagLinear
from dynadiag.checkpoint import load_checkpoint
from dynadiag.data import DataConfig, build_loaders
from dynadiag.ema import SparseEMA, diagonal_rows
from dynadiag.layers import DiagLinear
from dynadiag.loggers import build_logger
from dynadiag.lr_schedule import LRSchedule, TimmLRSchedule, build_lr_scheduler
from dynadiag.methods.base import SparseMethod
from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod
from dynadiag.models import create_model
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.trainer import Trainer, TrainerConfig

DATA = dict(name="synthetic", img_size=8, in_chans=3, num_classes=4, patch_size=4, num_train=64, num_val=32)


def make_trainer(
    run_dir, method=None, batch_size=16, epochs=2, lr_schedule=None, layer_decay=None, opt="adamw", **trainer_kw
):
    torch.manual_seed(0)
    data = build_loaders(DataConfig(**DATA, batch_size=batch_size, eval_batch_size=32), seed=0)
    model = create_model("vit_tiny_patch16_224", 4, 3, 8, 4, embed_dim=16, depth=2, num_heads=2)
    method = method if method is not None else SparseMethod()
    method.apply_(model)
    config = TrainerConfig(epochs=epochs, log_every_steps=1, progress="off", final_inference_iters=1, **trainer_kw)
    optimizer = functools.partial(
        timm.optim.create_optimizer_v2, opt=opt, lr=3e-3, weight_decay=0.05, layer_decay=layer_decay
    )
    return Trainer(
        model,
        method,
        optimizer,
        lr_schedule or LRSchedule(warmup_epochs=1),
        data,
        config,
        torch.device("cpu"),
        str(run_dir),
        logger=build_logger(str(run_dir), ["jsonl"]),
        run_config={"model": {"name": "vit_test"}, "data": dict(DATA)},
    )


def _sparse_method() -> SparseDynaDiagMethod:
    # candidate updates every step until the freeze at half the run: the topology changes at every step
    return SparseDynaDiagMethod(DiagSparsifyConfig(0.8, backend="reference"), delta_t=1, freeze_fraction=0.5)


# ------------------------------------------------------------------------------------------ gradient accumulation
def test_accumulation_equals_the_large_batch(tmp_path):
    """Two micro-batches of 16 per step take the same steps as batches of 32 (same samples, same mean loss)."""
    # SGD: an update proportional to the gradient, so a wrongly scaled accumulated gradient shows
    large = make_trainer(tmp_path / "large", batch_size=32, opt="sgd", save_checkpoints=False)
    accumulated = make_trainer(tmp_path / "accum", batch_size=16, opt="sgd", accum_steps=2, save_checkpoints=False)
    assert large.steps_per_epoch == accumulated.steps_per_epoch == 2
    large_summary, accumulated_summary = large.fit(), accumulated.fit()
    assert large_summary["steps"] == accumulated_summary["steps"] == 4
    for (name, a), b in zip(large.model.state_dict().items(), accumulated.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    lrs = [json.loads(line).get("train/lr") for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    # the schedule counts optimizer steps (2 per epoch, 4 in all), not micro-batches
    expected = [LRSchedule(warmup_epochs=1).factor(step, 2, 4) * 3e-3 for step in (1, 2, 3, 4)]
    assert [lr for lr in lrs if lr is not None] == pytest.approx(expected)


def test_accumulation_resumes_mid_epoch_exactly(tmp_path):
    method_kw = {"accum_steps": 2, "batch_size": 8}  # 8 batches of 8 per epoch: 4 optimizer steps
    full = make_trainer(tmp_path / "full", **method_kw)
    full.fit()
    make_trainer(tmp_path / "part", max_steps=3, **method_kw).fit()
    resumed = make_trainer(tmp_path / "part", **method_kw)
    resumed.fit(resume=str(tmp_path / "part"))
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_accumulation_larger_than_an_epoch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="accum_steps=5 exceeds the 4 batches"):
        make_trainer(tmp_path, accum_steps=5)
    with pytest.raises(ValueError, match="accum_steps must be an integer >= 1"):
        TrainerConfig(accum_steps=0)


# ------------------------------------------------------------------------------------------------------------ EMA
def test_ema_resync_carries_rows_by_diagonal():
    torch.manual_seed(0)
    layer = CandidateDiagLinear(16, 16, sparsity=0.75)  # K = 4 of 16 diagonals
    layer.set_candidates_(torch.arange(8))
    model = torch.nn.Sequential(layer)
    ema = SparseEMA(model, decay=0.5)
    with torch.no_grad():
        layer.V.add_(1.0)
    ema.update(model, step=5)  # EMA V = old V + 0.5
    averaged = dict(zip(diagonal_rows(ema.module[0]).tolist(), ema.module[0].V.detach().clone(), strict=True))
    layer.set_candidates_(torch.tensor([2, 3, 4, 5, 6, 7, 9, 12]))  # rows move, diagonals 9 and 12 are new
    ema.resync_(model)
    rows = diagonal_rows(ema.module[0]).tolist()
    assert rows == [2, 3, 4, 5, 6, 7, 9, 12] and ema.module[0].V.shape == layer.V.shape
    for row, diagonal in enumerate(rows):
        want = averaged[diagonal] if diagonal in averaged else layer.V.detach()[row]  # new ones: the model's values
        torch.testing.assert_close(ema.module[0].V[row], want)
    layer.freeze_()
    ema.resync_(model)
    frozen = ema.module[0]
    assert frozen.is_frozen and torch.equal(frozen.offsets, layer.offsets)
    for row, diagonal in enumerate(frozen.offsets.tolist()):
        torch.testing.assert_close(frozen.V[row], averaged.get(diagonal, layer.V.detach()[row]))
    ema.update(model, step=6)  # the structures agree again: the update runs


def test_ema_follows_topology_through_training_and_resumes(tmp_path):
    full = make_trainer(tmp_path / "full", _sparse_method(), epochs=2, ema_decay=0.9)
    summary = full.fit()
    model_state, ema_state = full.model.state_dict(), full.ema.module.state_dict()
    assert model_state.keys() == ema_state.keys()
    assert all(model_state[k].shape == ema_state[k].shape for k in model_state)
    assert any(not torch.equal(model_state[k], ema_state[k]) for k in model_state)  # an average, not a copy
    layers = [m for m in full.ema.module.modules() if isinstance(m, DiagLinear)]
    assert layers and all(layer.is_frozen for layer in layers)
    assert 0.0 <= summary["val_ema_top1_final"] <= 100.0 and summary["val_ema_top1_best"] >= 0.0
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ema/top1" in r for r in records)
    assert "ema" in load_checkpoint(tmp_path / "full")
    make_trainer(tmp_path / "part", _sparse_method(), epochs=2, ema_decay=0.9, max_steps=3).fit()
    resumed = make_trainer(tmp_path / "part", _sparse_method(), epochs=2, ema_decay=0.9)
    resumed.fit(resume=str(tmp_path / "part"))
    for key, value in ema_state.items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key


def test_ema_restarts_rows_that_the_stable_layout_gives_another_diagonal():
    torch.manual_seed(0)
    layer = CandidateDiagLinear(16, 16, sparsity=0.75)  # K = 4 of 16 diagonals
    layer.set_candidates_(torch.arange(8))
    layer.enable_stable_storage_(8)
    model = torch.nn.Sequential(layer)
    ema = SparseEMA(model, decay=0.5)
    with torch.no_grad():
        layer.V.add_(1.0)
    ema.update(model, step=5)  # EMA V = old V + 0.5
    averaged = ema.module[0].V.detach().clone()
    v = layer.V
    layer.set_candidates_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 12]))  # 7 leaves, 12 enters at zero into its row
    assert layer.V is v and layer.slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 12]
    ema.update(model, step=6)
    copy = ema.module[0]
    assert torch.equal(copy.slots, layer.slots)
    torch.testing.assert_close(copy.V[7], torch.zeros_like(copy.V[7]))  # the new diagonal: the model's values
    torch.testing.assert_close(copy.V[:7], 0.5 * averaged[:7] + 0.5 * layer.V.detach()[:7])  # the others: averaged
    layer.freeze_()
    ema.resync_(model)  # the freeze: rows matched by diagonal through the slots
    frozen = ema.module[0]
    assert frozen.is_frozen and torch.equal(frozen.offsets, layer.offsets)
    for row, diagonal in enumerate(frozen.offsets.tolist()):
        torch.testing.assert_close(frozen.V[row], copy.V[copy.slots.tolist().index(diagonal)])


def test_ema_off_by_default(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, save_checkpoints=False)
    summary = trainer.fit()
    assert trainer.ema is None and "val_ema_top1_final" not in summary
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainerConfig(ema_decay=1.0)


# ---------------------------------------------------------------------------------- layer decay and timm schedules
@pytest.mark.parametrize("schedule", [LRSchedule(warmup_epochs=1), TimmLRSchedule(warmup_epochs=1, warmup_lr=1e-4)])
def test_layer_decay_scales_every_group(tmp_path, schedule):
    trainer = make_trainer(tmp_path, _sparse_method(), lr_schedule=schedule, layer_decay=0.5, max_steps=3)
    trainer.fit()
    groups = trainer.optimizer.param_groups
    scales = sorted({group["lr_scale"] for group in groups})
    assert scales[0] < scales[-1] == 1.0  # the head keeps the full rate, the patch embedding the lowest
    peak = max(group["lr"] / group["lr_scale"] for group in groups)
    for group in groups:
        assert group["lr"] == pytest.approx(peak * group["lr_scale"])
    assert trainer.method._alpha_opt.param_groups[0]["lr"] == pytest.approx(peak)  # alpha: the undecayed rate
    held = {id(p) for group in groups for p in group["params"]}  # the candidate updates kept the new V in the groups
    assert all(id(m.V) in held for m in trainer.model.modules() if isinstance(m, DiagLinear))


def test_timm_schedule_steps_per_update_and_resumes():
    def optimizer():
        return torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)

    config = TimmLRSchedule(sched="cosine", warmup_epochs=2, warmup_lr=1e-3, min_lr=1e-4)
    ours_opt, timm_opt = optimizer(), optimizer()
    ours = build_lr_scheduler(ours_opt, config, steps_per_epoch=5, total_steps=50)
    reference = CosineLRScheduler(
        timm_opt, t_initial=50, lr_min=1e-4, warmup_t=10, warmup_lr_init=1e-3, t_in_epochs=False
    )
    for update in range(1, 51):
        ours.step()
        reference.step_update(update)
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(timm_opt.param_groups[0]["lr"]), update
        if update == 20:
            state = ours.state_dict()
    resumed_opt = optimizer()
    resumed = build_lr_scheduler(resumed_opt, config, steps_per_epoch=5, total_steps=50)
    resumed.load_state_dict(state)
    reference.step_update(21)
    resumed.step()
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(timm_opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="per-step schedules"):
        TimmLRSchedule(sched="plateau")


def test_ema_in_a_plain_loop_with_attach():
    """Own loops: ``on_topology_change(ema.resync_)`` keeps the average through candidate updates and the freeze."""
    import torch.nn.functional as F

    import dynadiag

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 4, 3, 8, 4, embed_dim=16, depth=2, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    method = SparseDynaDiagMethod(DiagSparsifyConfig(0.8, backend="reference"), delta_t=1, freeze_fraction=0.5)
    attached = dynadiag.attach(model, optimizer, method, total_steps=6)
    ema = SparseEMA(model, decay=0.9)
    changes = []
    attached.on_topology_change(lambda module: (ema.resync_(module), changes.append(attached.step)))
    for step in range(1, 7):
        loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 4, (4,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model, step)
    assert changes  # candidate updates and the freeze happened, and the average followed each
    model_state, ema_state = model.state_dict(), ema.module.state_dict()
    assert {k: v.shape for k, v in model_state.items()} == {k: v.shape for k, v in ema_state.items()}
    assert all(m.is_frozen for m in ema.module.modules() if isinstance(m, DiagLinear))
