"""Exact resume: a ``train.py`` process killed with SIGKILL mid-epoch, resumed from its last checkpoint, ends
bit for bit where an uninterrupted run ends (CPU, fixed seed); re-running in the same directory auto-resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

import train
from dynadiag.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 256 images / batch 16 = 16 steps per epoch, 3 epochs. The default method (sparse_dynadiag) swaps candidate
# diagonals after steps 4, 8, ..., 20 (regrow.delta_t=4: each swap replaces V and its optimizer state) and freezes
# after step 24 (half the run): a resume must replay both topology changes. Checkpoints every 5 steps (5, 10, ...,
# 45) are all mid-epoch, and the first one already holds a swapped candidate set; only the final evaluation writes
# one at an epoch end.
STEPS_PER_EPOCH, TOTAL, DELTA_T, FREEZE = 16, 48, 4, 24
OVERRIDES = [
    "data=synthetic",
    "data.img_size=8",
    "data.num_train=256",
    "data.num_val=64",
    "data.batch_size=16",
    "model=vit_nano",
    "trainer=smoke",
    "trainer.max_steps=null",
    "trainer.epochs=3",
    "trainer.eval_every_epochs=100",
    "trainer.ckpt_every_steps=5",
    "trainer.log_every_steps=1",
    "sparsifier=sparse_dynadiag",
    f"regrow.delta_t={DELTA_T}",
    "trainer.inference_iters=0",
    "trainer.final_inference_iters=0",
    "backend=reference",
    "logger=local",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread here and in the child (OMP_NUM_THREADS=1): identical CPU reductions in every process, and on a
    # busy shared machine 2-thread OpenMP barriers made each tiny step ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def kill_after_first_checkpoint(run_dir, timeout: float = 240.0) -> int:
    """Start ``train.py`` in ``run_dir``, SIGKILL it once a checkpoint exists; return the checkpoint's step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    try:
        while not last.exists():
            if proc.poll() is not None:
                pytest.fail(f"train.py exited ({proc.returncode}) before its first checkpoint: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within the timeout")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return int(load_checkpoint(last)["step"])


def _new_diagonals_per_step(run_dir) -> dict[int, float]:
    """Step -> diagonals that entered the candidate sets at that step's update (from metrics.jsonl)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/sparse_dynadiag/num_new"] for r in records if "train/sparse_dynadiag/num_new" in r}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    killed_at = kill_after_first_checkpoint(tmp_path / "killed")
    assert DELTA_T <= killed_at < FREEZE and killed_at % STEPS_PER_EPOCH != 0  # mid-epoch, mid-selection
    # Re-running the same command in the same directory: resume=auto (the default) picks up last.pt.
    cfg = compose_cfg(OVERRIDES)
    assert cfg.resume == "auto"
    resumed = train.train(cfg, run_dir=str(tmp_path / "killed"))
    reference = train.train(compose_cfg(OVERRIDES), run_dir=str(tmp_path / "reference"))
    assert resumed["steps"] == reference["steps"] == TOTAL
    # the resumed stretch crossed real topology changes: candidate swaps that brought in new diagonals, and the freeze
    swaps = _new_diagonals_per_step(tmp_path / "reference")
    assert sorted(swaps) == list(range(DELTA_T, FREEZE, DELTA_T))
    assert any(swaps[step] > 0 for step in swaps if step > killed_at) and swaps[DELTA_T] > 0
    assert _new_diagonals_per_step(tmp_path / "killed") == swaps
    assert reference["topk_share_at_freeze"] == pytest.approx(1.0)
    for key in ("val_loss_final", "val_top1_final", "val_top5_final", "val_top1_best", "sparsity_effective"):
        assert resumed[key] == reference[key], key  # bitwise, not approximately
    a, b = final_weights(tmp_path / "killed"), final_weights(tmp_path / "reference")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the killed run's metrics file continues after the restart; its last evaluation equals the reference's
    evals = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if "val/loss" in line]
        for run in ("killed", "reference")
    ]
    assert evals[0][-1]["val/loss"] == evals[1][-1]["val/loss"] and evals[0][-1]["step"] == TOTAL


def test_rerun_of_a_finished_run_resumes_at_its_end(tmp_path):
    overrides = [*OVERRIDES, "trainer.epochs=1", "trainer.ckpt_every_steps=0"]
    first = train.train(compose_cfg(overrides), run_dir=str(tmp_path))
    again = train.train(compose_cfg(overrides), run_dir=str(tmp_path))  # auto-resume: no step is trained twice
    assert first["steps"] == again["steps"] == STEPS_PER_EPOCH
    assert again["val_loss_final"] == first["val_loss_final"]
    fresh = train.train(compose_cfg([*overrides, "resume=null"]), run_dir=str(tmp_path / "fresh"))
    assert fresh["val_loss_final"] == first["val_loss_final"]  # same seed, same result


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run with OVERRIDES (shared by the signal tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("reference")
        return train.train(compose_cfg(OVERRIDES), run_dir=str(run_dir)), run_dir
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, sig, reference_run):
    """Slurm pre-emption / scancel (SIGTERM) and the pre-timeout signal (SIGUSR1): the run saves ``last.pt`` at the
    next step boundary and exits with status 0; re-running the command ends bit for bit like an uninterrupted run."""
    run_dir = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("SLURM_JOB_ID", None)  # never requeue a real job from a test
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"train.py ended before its first checkpoint: {proc.communicate()[0][-2000:]}"
    first = int(load_checkpoint(last)["step"])
    proc.send_signal(sig)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = int(load_checkpoint(last)["step"])
    assert first <= stopped < TOTAL, out[-2000:]
    assert f"stopped by {sig.name} at step {stopped} " in out and "run the same command again to resume" in out
    assert not (run_dir / "summary.json").exists()  # the run is not finished
    resumed = train.train(compose_cfg(OVERRIDES), run_dir=str(run_dir))  # resume=auto
    reference, reference_dir = reference_run
    assert resumed["steps"] == reference["steps"] == TOTAL
    assert _new_diagonals_per_step(run_dir) == _new_diagonals_per_step(reference_dir)  # the same swaps
    for key in ("val_loss_final", "val_top1_final", "val_top5_final", "val_top1_best", "sparsity_effective"):
        assert resumed[key] == reference[key], key
    a, b = final_weights(run_dir), final_weights(reference_dir)
    for key in b:
        assert torch.equal(a[key], b[key]), key
