"""Multi-process training: ``scripts/train_ddp.sh`` (torchrun, 2 CPU ranks, gloo) end to end, and the
process-group helpers the trainer relies on (agreement checks, all-reduced decisions)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

import train
from dynadiag import distributed as dist_utils
from dynadiag.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# global batch 32 = 2 ranks x 16; 128 images -> 4 steps per epoch whatever the number of ranks
OVERRIDES = [
    "data=synthetic",
    "data.img_size=8",
    "data.num_train=128",
    "data.num_val=64",
    "data.batch_size=32",
    "model=vit_nano",
    "trainer=smoke",
    "trainer.max_steps=null",
    "trainer.epochs=2",
    "trainer.inference_iters=0",
    "trainer.final_inference_iters=0",
    "schedule.freeze_epoch=1",  # a freeze (new parameters, DDP rebuilt) half-way through
    "backend=reference",
    "logger=local",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_rank0_writes_ranks_agree(tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [os.path.join(ROOT, "scripts", "train_ddp.sh"), "2", *OVERRIDES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 prints the summary
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True  # bitwise-equal weights and offsets
    assert summary["steps"] == 8  # frozen on both ranks: K * D of P * D per layer (vit_nano at 90 %)
    assert summary["sparsity_target_layers"] == pytest.approx(1 - (10 + 4 + 13 + 13) * 32 / 12288, rel=1e-12)
    # rank 0 alone logged: every step once (two writers appending would duplicate them)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, 9))
    assert len([r for r in records if "val/loss" in r]) == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.pt", "last.pt"]
    state = load_checkpoint(run_dir)
    assert state["step"] == 8 and state["steps_per_epoch"] == 4  # the global batch, split over the ranks
    # every rank's own generator states (augmentation, dropout): saved per rank, and the ranks' streams differ
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and torch.equal(ranks[0]["torch"], state["rng"]["torch"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"]) and ranks[0]["python"] != ranks[1]["python"]
    # One process with the same global batch sees the same samples at every step (rank r of the sampler takes
    # every other index of the same permutation), so only the order of float sums differs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
            single = train.train(compose(config_name="config", overrides=OVERRIDES), run_dir=str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    assert single["steps"] == summary["steps"]
    assert single["val_loss_final"] == pytest.approx(summary["val_loss_final"], rel=1e-4)
    single_state = load_checkpoint(tmp_path / "one")["model"]
    for key, value in state["model"].items():
        if key.endswith("offsets"):
            assert torch.equal(value, single_state[key]), key  # the same diagonals frozen
        else:
            torch.testing.assert_close(value, single_state[key], rtol=1e-3, atol=1e-4)  # Adam: tiny grads, ~lr steps


def _helpers_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        same = [torch.arange(6.0).reshape(2, 3), torch.tensor([3, 1, 2])]
        permuted = [torch.arange(6.0).reshape(2, 3), torch.tensor([3, 1, 2] if rank == 0 else [1, 3, 2])]
        nudged = [torch.arange(6.0) + (1e-6 if rank == 1 else 0.0)]
        results = {
            "same": dist_utils.ranks_agree(same),
            "permuted": dist_utils.ranks_agree(permuted),  # same sum, different order
            "nudged": dist_utils.ranks_agree(nudged),
            "any_one": dist_utils.any_rank(rank == 1),
            "any_none": dist_utils.any_rank(False),
            "sum": dist_utils.all_reduce_sum(torch.tensor([1.0 + rank, 1.0])).tolist(),
            "broadcast": dist_utils.broadcast_object(f"dir-of-rank-{rank}"),
            "gathered": dist_utils.all_gather_object(f"state-of-rank-{rank}"),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()


def test_helpers_on_two_gloo_ranks(tmp_path):
    mp.spawn(_helpers_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["same"] is True and r["permuted"] is False and r["nudged"] is False
        assert r["any_one"] is True and r["any_none"] is False
        assert r["sum"] == [3.0, 2.0] and r["broadcast"] == "dir-of-rank-0"
        assert r["gathered"] == ["state-of-rank-0", "state-of-rank-1"]


def test_rank_seed_keeps_rank_zero_and_separates_the_others():
    assert dist_utils.rank_seed(7, 0) == 7  # one process draws what it always drew
    seeds = {dist_utils.rank_seed(7, r) for r in range(1, 9)} | {dist_utils.rank_seed(8, 1), 7}
    assert len(seeds) == 10  # distinct per (seed, rank)
    # the same in every process whatever PYTHONHASHSEED says (the ranks and a resumed run must agree)
    code = "from dynadiag.distributed import rank_seed; print(rank_seed(7, 3))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
        ).stdout.strip()
        for h in ("0", "1")
    }
    assert outs == {str(dist_utils.rank_seed(7, 3))}


def test_single_process_helpers_are_no_ops():
    assert not dist_utils.is_dist() and dist_utils.world_size() == 1 and dist_utils.is_main_process()
    assert dist_utils.ranks_agree([torch.ones(2)]) and dist_utils.any_rank(True) and not dist_utils.any_rank(False)
    assert dist_utils.broadcast_object("x") == "x" and dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(("env", "expected"), [({}, 1), ({"WORLD_SIZE": "4"}, 4)])
def test_env_world_size(monkeypatch, env, expected):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist_utils.env_world_size() == expected


def test_slurm_task_gets_torchrun_variables():
    """Task 1 of a 4-task, 2-node job submitted by submitit (hydra/launcher=slurm): the variables Slurm and
    submitit set become the ones ``init_process_group(init_method="env://")`` reads."""
    saved = dict(os.environ)
    try:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update(
            SUBMITIT_EXECUTOR="slurm",
            SLURM_JOB_ID="4242",
            SLURM_NTASKS="4",
            SLURM_JOB_NUM_NODES="2",
            SLURM_NODEID="0",
            SLURM_JOB_NODELIST="gpu[07-08]",
            SLURM_PROCID="1",
            SLURM_LOCALID="1",
        )
        assert dist_utils.env_world_size() == 4  # known before any process group, for config validation
        assert dist_utils.export_slurm_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "4", "1")
        assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
        assert dist_utils.local_rank() == 1 and not dist_utils.export_slurm_env()  # torchrun variables win
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _launch(run_dir, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [os.path.join(ROOT, "scripts", "train_ddp.sh"), "2", *OVERRIDES, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


#: dropout: every rank draws its own masks (from the same generators augmentation uses), which a resume must restore
#: per rank
RANDOM = ["+model.drop_rate=0.2", "+model.proj_drop_rate=0.2", "+model.attn_drop_rate=0.2"]


@pytest.mark.slow
def test_torchrun_resume_matches_uninterrupted_two_rank_run(tmp_path):
    """Two ranks stopped mid-epoch (step 3 of 8) and re-launched with the same command in the same directory end
    bit for bit where an uninterrupted two-rank run ends, with dropout drawn per rank."""
    reference = _launch(tmp_path / "reference", *RANDOM)
    first = _launch(tmp_path / "resumed", *RANDOM, "trainer.max_steps=3")
    for proc in (reference, first):
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    second = _launch(tmp_path / "resumed", *RANDOM)  # resume=auto picks up checkpoints/last.pt at step 3
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out[-3000:]
    assert "resumed from" in out and "at step 3" in out
    a, b = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("resumed", "reference"))
    assert a["steps"] == b["steps"] == 8 and a["ranks_in_sync"] and b["ranks_in_sync"]
    assert a["val_loss_final"] == b["val_loss_final"]
    wa, wb = (load_checkpoint(tmp_path / run)["model"] for run in ("resumed", "reference"))
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow  # ~30 s: two ranks through train.py
def test_torchrun_gradient_accumulation_and_ema(tmp_path):
    """Two ranks, two micro-batches of 8 per rank and step (DDP all-reduces on the last one only), with an EMA that
    follows the freeze: the ranks end identical and the steps count optimizer updates."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    overrides = ["data.batch_size=16", "trainer.accum_steps=2", "trainer.ema_decay=0.9"]
    result = subprocess.run(
        [os.path.join(ROOT, "scripts", "train_ddp.sh"), "2", *OVERRIDES, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["steps"] == 8 and load_checkpoint(run_dir)["steps_per_epoch"] == 4
    assert summary["val_ema_top1_final"] is not None
