"""Faults a long run meets: a full disk while saving, a corrupt or truncated checkpoint, a diverging loss; and the
numerics/compilation switches (AMP bf16/fp16, torch.compile) as short end-to-end runs through ``train.train``."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import composition
import dynadiag.checkpoint as checkpoint_mod
import train
from dynadiag.checkpoint import CheckpointError, load_checkpoint
from dynadiag.kernels import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 images / batch 16 = 4 steps per epoch; DynaDiag freezes after epoch 1, so both phases run
SMOKE = [
    "data=synthetic",
    "data.img_size=8",
    "data.num_train=64",
    "data.num_val=32",
    "data.batch_size=16",
    "model=vit_nano",
    "trainer=smoke",
    "trainer.max_steps=null",
    "trainer.epochs=2",
    "trainer.inference_iters=0",
    "trainer.final_inference_iters=0",
    "schedule.freeze_epoch=1",
    "backend=reference",
    "logger=local",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: 2-thread OpenMP barriers only cost time on a busy machine
    yield
    torch.set_num_threads(threads)


def run(run_dir, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMOKE, *overrides])
    return train.train(cfg, run_dir=str(run_dir))


def user_error(exc_info) -> str:
    message = composition.error_message(exc_info.value)
    assert message is not None and "\n" not in message, exc_info.value
    return message


# ---------------------------------------------------------------- failed saves
def _disk_full_mid_write(obj, fh, *args, **kwargs):
    fh.write(b"PK\x03\x04 half a checkpoint")  # bytes reach the temp file, then the disk fills up
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_on_rename(src, dst):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    ("target", "failure"), [("torch.save", _disk_full_mid_write), ("os.replace", _disk_full_on_rename)]
)
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, failure):
    run(tmp_path, "trainer.max_steps=2", "trainer.epochs=2")  # a good last.pt at step 2
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()
    module, name = target.split(".")
    monkeypatch.setattr(getattr(checkpoint_mod, module), name, failure)
    with pytest.raises(CheckpointError) as info:
        run(tmp_path, "trainer.epochs=2")  # resumes at step 2, fails at its first save
    assert user_error(info).startswith(f"could not write checkpoint {last} (No space left on device)")
    monkeypatch.undo()
    assert last.read_bytes() == good and load_checkpoint(last)["step"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.pt", "last.pt"]  # no temp file left behind


# ------------------------------------------------------- corrupt checkpoints
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_last_checkpoint_is_a_clear_error_and_is_not_overwritten(tmp_path, damage):
    run(tmp_path, "trainer.max_steps=2")
    last = tmp_path / "checkpoints" / "last.pt"
    data = last.read_bytes()
    bad = data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data))
    last.write_bytes(bad)
    with pytest.raises(CheckpointError) as info:
        run(tmp_path)  # resume=auto finds the damaged last.pt: stop, do not start afresh over it
    assert user_error(info).startswith(f"checkpoint {last} is corrupt or truncated")
    assert last.read_bytes() == bad  # left as found, for the user to inspect or replace
    # an explicit older checkpoint still works, and the run then writes a fresh last.pt
    summary = run(tmp_path, f"resume={tmp_path / 'checkpoints' / 'best.pt'}")
    assert summary["steps"] == 8 and load_checkpoint(last)["step"] == 8


# ------------------------------------------------------------- diverging loss
def test_diverging_run_stops_at_the_first_nonfinite_loss(tmp_path):
    with pytest.raises(FloatingPointError) as info:
        run(tmp_path, "optim.lr=1e30", "trainer.grad_clip=null")  # Adam steps of ~1e30 overflow the logits
    message = user_error(info)
    assert message.startswith("non-finite loss (") and "at step" in message
    step = int(message.split("at step ")[1].split(";")[0])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flagged = [r for r in records if "train/nonfinite_loss" in r]
    assert len(flagged) == 1 and flagged[0]["step"] == step and step >= 1  # logged with its step, then stopped


def test_diverging_run_can_skip_bad_steps(tmp_path):
    summary = run(tmp_path, "optim.lr=1e30", "trainer.grad_clip=null", "trainer.nonfinite=skip")
    assert summary["steps"] == 8  # every step counted, bad updates dropped
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/nonfinite_loss" in r for r in records)


# ------------------------------------------------------------ AMP and compile
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in available_backends(torch.device("cpu"))])
def test_amp_smoke_run(tmp_path, amp, backend):
    summary = run(tmp_path, f"trainer.amp={amp}", f"backend={backend}")
    assert summary["steps"] == 8 and 0.0 < summary["val_loss_final"] < 10.0  # finite through both phases
    state = load_checkpoint(tmp_path)
    assert (amp == "fp16") == bool(state["scaler"])  # the gradient scaler runs (and is saved) for fp16 only
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16 for v in state["model"].values())


def test_compile_smoke_run_has_no_graph_breaks(tmp_path):
    """``aot_eager`` traces forward and backward like inductor does, without generating code (seconds, not the
    minutes inductor needs on a busy CPU); the inductor run is the slow test below."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # the paper method: sparse_dynadiag's soft phase reads its candidate set with torch.nonzero (a graph break)
    summary = run(tmp_path, "trainer.compile=true", "trainer.compile_backend=aot_eager", "sparsifier=dynadiag")
    assert summary["steps"] == 8  # recompiled after the freeze: K * D of P * D per layer (vit_nano at 90 %)
    assert summary["sparsity_target_layers"] == pytest.approx(1 - (10 + 4 + 13 + 13) * 32 / 12288, rel=1e-12)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # soft phase and frozen phase


@pytest.mark.slow
def test_compile_inductor_frozen_cpu_kernels(tmp_path):
    if "cpu" not in available_backends(torch.device("cpu")):
        pytest.skip("the cpu kernel backend is not available")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summary = run(tmp_path, "trainer.compile=true", "backend=cpu", "trainer.max_steps=6")
    assert summary["steps"] == 6 and not torch._dynamo.utils.counters["graph_break"]
    layers = [m for m in torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]]
    assert any(k.endswith(".offsets") for k in layers)  # frozen DiagLinear layers ran compiled
