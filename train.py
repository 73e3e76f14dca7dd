"""Train a (diagonally) sparse vision model from a Hydra config.

    python train.py                                   # digits, small ViT, DynaDiag at 90 % sparsity
    python train.py model=vit_b data=imagenet sparsity=0.9
    python train.py -m sparsity=0.5,0.7,0.8,0.9,0.95  # one job per sparsity
    python train.py +experiment=digits_sweep          # a saved experiment with its own sweep grid
    python train.py resume=outputs/<date>/<time>      # continue a run from its last checkpoint

This file and ``eval.py`` are the only places that touch Hydra/OmegaConf: they turn the config into plain
objects (``instantiate(..., _convert_="all")``) and hand them to :class:`dynadiag.trainer.Trainer`.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or oversubscribed CPU, spinning
# threads made a training step ~30x slower here (14 s vs 0.47 s); set OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import sys
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dynadiag import distributed as dist_utils
from dynadiag.checkpoint import CheckpointError
from dynadiag.functional import validate_sparsity
from dynadiag.kernels import BackendUnavailableError, backend_names, get_backend
from dynadiag.loggers import build_logger
from dynadiag.trainer import Trainer, format_summary

#: ``${mul:a,b}``: lets a group derive a value from another group (freeze epoch = fraction x trainer.epochs).
OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b), replace=True)

#: what a user can get wrong in a config; printed as one ``error: ...`` line (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, BackendUnavailableError, FloatingPointError)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device(name)


def validate_config(cfg: DictConfig) -> torch.device:
    """Check the values a user sets before anything is built; raise ``ValueError`` with one clear line.

    Returns:
        The device to train on.
    """
    validate_sparsity(cfg.sparsity, where="")
    device = resolve_device(str(cfg.device))
    backend = str(cfg.backend)
    if backend not in backend_names():
        raise ValueError(f"unknown backend '{backend}'; choose one of {backend_names()}")
    if backend != "auto":
        get_backend(backend, device)  # raises with the list of backends available on this device
    batch = int(cfg.data.batch_size)
    if batch < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch}")
    world = dist_utils.env_world_size()  # known from the launcher's environment before any process group exists
    if batch % world:
        raise ValueError(
            f"data.batch_size={batch} (the global batch) is not divisible by the {world} ranks; "
            f"use a multiple of {world}"
        )
    return device


def check_group_overrides(args: list[str], config_dir: str | None = None) -> str | None:
    """One line naming an unknown config-group option on the command line (``model=vit_zz``) and listing the
    choices, or None. Hydra's own error spans many lines; this runs before it."""
    config_dir = config_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").split("@")[0]
        folder = os.path.join(config_dir, group)
        if group.startswith("hydra") or "." in group or not os.path.isdir(folder) or "(" in value or "[" in value:
            continue
        choices = sorted(f[: -len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))
        for option in value.split(","):  # a sweep: model=vit_t,vit_s
            if option not in choices and option != "null":
                return f"unknown {group} '{option}'; choose one of {choices}"
    return None


def group_choices() -> dict[str, str]:
    """Which option of each config group was chosen (empty outside a Hydra app)."""
    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def default_run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    model = choices.get("model", str(cfg.model.get("name", "model")))
    method = choices.get("sparsifier", "sparse")
    name = f"{model}-{method}-s{cfg.sparsity:g}-seed{cfg.seed}"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        name += f"-j{HydraConfig.get().job.num}"  # jobs of a sweep never share a name
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model_and_method(cfg: DictConfig | dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The model and its (unapplied) sparse method from a config (also used by ``eval.py``)."""
    model = instantiate(cfg["model"], _convert_="all")
    method = instantiate(cfg["sparsifier"], _convert_="all")
    return model, method


def train(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one training job; returns the summary. ``run_dir`` defaults to Hydra's output directory."""
    device = validate_config(cfg)
    owns_group = not dist_utils.is_dist()
    device = dist_utils.setup(device)  # torchrun/Slurm ranks join the process group; cuda -> cuda:<local rank>
    is_main = dist_utils.is_main_process()
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    # Every rank uses rank 0's directory, even if the ranks' clocks gave them different ${now:...} run dirs.
    run_dir = dist_utils.broadcast_object(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    choices = group_choices()
    name = cfg.run_name or default_run_name(cfg, choices)
    resume = cfg.resume
    if resume == "auto":  # continue this run directory's own last checkpoint if there is one
        last = os.path.join(run_dir, "checkpoints", "last.pt")
        resume = last if os.path.isfile(last) else None
    resume = dist_utils.broadcast_object(resume)  # rank 0's view of the run directory decides for everyone
    seed_everything(int(cfg.seed))

    data_cfg = instantiate(cfg.data, _convert_="all")
    # data.batch_size is the global batch: each rank loads its share, so the steps per epoch, the schedules and
    # the optimisation do not depend on the number of ranks (validate_config checked the division).
    data_cfg.batch_size //= dist_utils.world_size()
    from dynadiag.data import build_loaders

    data = build_loaders(data_cfg, seed=int(cfg.seed), rank=dist_utils.rank(), world_size=dist_utils.world_size())
    model, method = build_model_and_method(cfg)
    optimizer_factory = instantiate(cfg.optim, _convert_="all")
    lr_schedule = instantiate(cfg.lr_schedule, _convert_="all")
    trainer_cfg = instantiate(cfg.trainer, _convert_="all")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["choices"] = choices
    group = cfg.logger.group
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = os.path.basename(os.path.normpath(HydraConfig.get().sweep.dir))
    logger = build_logger(
        run_dir,
        list(cfg.logger.backends),
        project=cfg.logger.project,
        name=name,
        group=group,
        mode=cfg.logger.mode,
        entity=cfg.logger.entity,
        tags=list(cfg.logger.tags),
        config=resolved,
    )
    info = {
        "run_name": name,
        "model": choices.get("model", cfg.model.get("name")),
        "data": data_cfg.name,
        # the method's own target: a dense run is at 0 in tables and plots whatever the top-level knob says
        "sparsity": float(cfg.sparsifier.get("sparsity", 0.0)),
        "seed": int(cfg.seed),
        "backend": str(cfg.backend),
    }
    trainer = Trainer(
        model,
        method,
        optimizer_factory,
        lr_schedule,
        data,
        trainer_cfg,
        device,
        run_dir,
        logger=logger,
        run_config=resolved,
        info=info,
        seed=int(cfg.seed),
    )
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


def error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, looking through Hydra's instantiate wrappers; None otherwise."""
    seen = exc
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return str(seen).splitlines()[0] if str(seen) else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val_top1_best")  # the objective, for sweepers that optimise it


if __name__ == "__main__":
    if (unknown := check_group_overrides(sys.argv[1:])) is not None:
        print(f"error: {unknown}", file=sys.stderr)
        sys.exit(2)
    main()
