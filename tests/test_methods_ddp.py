"""Under DDP every rank must apply the same mask/diagonal update: two CPU ranks (gloo), different data per rank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _methods_common import CLASSES, IMG, tiny_vit
from torch.nn.parallel import DistributedDataParallel

from dynadiag.methods.diag_heur import DiagHeurMethod
from dynadiag.methods.gmp import GMPMethod
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.regrow import RegrowSchedule
from dynadiag.methods.rigl import RigLMethod
from dynadiag.methods.set import SETMethod
from dynadiag.methods.srigl import SRigLMethod
from dynadiag.methods.static import StaticMethod
from dynadiag.sparsify import DiagSparsifyConfig

METHODS = {
    "static": lambda: StaticMethod(MaskSparsifyConfig(0.8)),
    "set": lambda: SETMethod(MaskSparsifyConfig(0.8), RegrowSchedule(delta_t=1, t_end=1.0)),
    "rigl": lambda: RigLMethod(MaskSparsifyConfig(0.8), RegrowSchedule(delta_t=1, t_end=1.0)),
    "srigl": lambda: SRigLMethod(MaskSparsifyConfig(0.8), RegrowSchedule(delta_t=1, t_end=1.0)),
    "gmp": lambda: GMPMethod(MaskSparsifyConfig(0.8), end_epoch=1, update_every=1),
    "diag_heur": lambda: DiagHeurMethod(
        DiagSparsifyConfig(0.8, backend="reference"), RegrowSchedule(delta_t=1, t_end=1.0)
    ),
}
STEPS = 3


def _topology(model):
    state = model.state_dict()
    keys = [k for k in state if k.endswith(("weight_mask", "offsets"))]
    return torch.cat([state[k].flatten().long() for k in keys]) if keys else torch.zeros(0, dtype=torch.long)


def _worker(rank, world_size, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, factory in METHODS.items():
            torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast them anyway)
            model = tiny_vit()
            method = factory()
            method.apply_(model)
            method.bind(steps_per_epoch=STEPS, total_steps=STEPS)
            # broadcast_buffers=False: masks/offsets are never copied from rank 0, so equality proves agreement
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            changes = 0.0
            for step in range(STEPS):
                method.on_step_start(step, ddp)
                x = torch.randn(4, 3, IMG, IMG, generator=generator)
                y = torch.randint(0, CLASSES, (4,), generator=generator)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
                method.on_after_backward(step, ddp, optimizer)
                optimizer.step()
                metrics = method.on_after_optimizer_step(step, ddp, optimizer)
                changes += sum(v for k, v in metrics.items() if k.endswith(("num_new", "num_pruned")))
            topology = _topology(model)
            gathered = [torch.zeros_like(topology) for _ in range(world_size)]
            dist.all_gather(gathered, topology)
            weights = torch.cat([p.detach().flatten() for p in model.parameters()])
            all_weights = [torch.zeros_like(weights) for _ in range(world_size)]
            dist.all_gather(all_weights, weights)
            if rank == 0:
                results[name] = (
                    all(torch.equal(gathered[0], g) for g in gathered[1:]),
                    all(torch.equal(all_weights[0], w) for w in all_weights[1:]),
                    changes,
                )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~45 s on the shared 2-core machine: two processes, six methods
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_all_ranks_apply_the_same_update(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, os.fspath(tmp_path / "pg"), results), nprocs=2, join=True)
        results = dict(results)
    assert set(results) == set(METHODS)
    for name, (same_topology, same_weights, changes) in results.items():
        assert same_topology, f"{name}: ranks disagree on the masks/diagonals"
        assert same_weights, f"{name}: ranks' weights diverged"
        if name != "static":
            assert changes > 0, f"{name}: no topology change happened, the test would prove nothing"
