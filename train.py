"""Train a (diagonally) sparse vision model from a Hydra config.

    python train.py                                   # digits, small ViT, DynaDiag at 90 % sparsity
    python train.py model=vit_b data=imagenet sparsity=0.9
    python train.py -m sparsity=0.5,0.7,0.8,0.9,0.95  # one job per sparsity
    python train.py +experiment=digits_sweep          # a saved experiment with its own sweep grid
    python train.py resume=outputs/<date>/<time>      # continue a run from its last checkpoint

The objects come from :mod:`composition` (shared with ``eval.py`` and ``prune.py``): data, the already sparse
model and its method, then the :class:`dynadiag.trainer.Trainer` that runs them.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or oversubscribed CPU, spinning
# threads made a training step ~30x slower here (14 s vs 0.47 s); set OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import composition as comp
from dynadiag import distributed as dist_utils
from dynadiag.trainer import format_summary


def default_run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    model = choices.get("model", str(cfg.model.get("name", "model")))
    method = choices.get("sparsifier", "sparse")
    name = f"{model}-{method}-s{cfg.sparsity:g}-seed{cfg.seed}"
    if comp.is_multirun():
        name += f"-j{HydraConfig.get().job.num}"  # jobs of a sweep never share a name
    return name


def train(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one training job; returns the summary. ``run_dir`` defaults to Hydra's output directory."""
    device = comp.validate_config(cfg)
    owns_group = not dist_utils.is_dist()
    device = dist_utils.setup(device)  # torchrun/Slurm ranks join the process group; cuda -> cuda:<local rank>
    is_main = dist_utils.is_main_process()
    # Every rank uses rank 0's directory, even if the ranks' clocks gave them different ${now:...} run dirs.
    run_dir = dist_utils.broadcast_object(comp.run_dir(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    resume = cfg.resume
    if resume == "auto":  # continue this run directory's own last checkpoint if there is one
        last = os.path.join(run_dir, "checkpoints", "last.pt")
        resume = last if os.path.isfile(last) else None
    resume = dist_utils.broadcast_object(resume)  # rank 0's view of the run directory decides for everyone
    comp.seed_everything(int(cfg.seed))

    data = comp.build_data(cfg.data, int(cfg.seed), dist_utils.rank(), dist_utils.world_size())
    model, method, report = comp.build_sparse_model(cfg.model, cfg.sparsifier)
    if report is not None and not resume and is_main:
        print(report, flush=True)

    choices = comp.group_choices()
    name = cfg.run_name or default_run_name(cfg, choices)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["choices"] = choices
    group = cfg.logger.group
    if group is None and comp.is_multirun():
        group = os.path.basename(os.path.normpath(HydraConfig.get().sweep.dir))
    logger = comp.build_run_logger(cfg.logger, run_dir, name, resolved, group)
    info = {
        "run_name": name,
        "model": choices.get("model", cfg.model.get("name")),
        "data": str(cfg.data.name),
        # the method's own target: a dense run is at 0 in tables and plots whatever the top-level knob says
        "sparsity": float(method.sparsity),
        "seed": int(cfg.seed),
        "backend": str(cfg.backend),
    }
    trainer = comp.build_trainer(cfg, model, method, data, device, run_dir, logger, resolved, info, int(cfg.seed))
    try:
        summary = trainer.fit(resume=resume)
    finally:
        logger.finish()
        if owns_group:
            dist_utils.cleanup()
    if is_main:
        print(format_summary(summary))
        print(f"run directory: {run_dir}")
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    summary = comp.run_job(train, cfg)
    return summary.get("val_top1_best")  # the objective, for sweepers that optimise it


if __name__ == "__main__":
    if (unknown := comp.check_group_overrides(sys.argv[1:])) is not None:
        print(f"error: {unknown}", file=sys.stderr)
        sys.exit(2)
    main()
