"""The composition root shared by ``train.py``, ``eval.py`` and ``prune.py``: a Hydra config in, plain objects out.

The entry scripts stay thin and never import one another: each composes its config, calls the builders here and
hands plain objects (dataclasses, modules, callables) to :mod:`dynadiag`, which never sees Hydra or OmegaConf.
This module and the entry scripts are the only callers of ``hydra.utils.instantiate`` (always with
``_convert_="all"``, so no OmegaConf container leaks into the library). Importing it has no side effect, and
the configs need no custom resolver.

Route of a run (``train.py``)::

    validate_config(cfg)                       device, backend (and auto's measurement switch), global batch vs ranks
    build_data(cfg.data, ...)                  DataConfig -> loaders for this rank's share of the global batch
    build_sparse_model(cfg.model, cfg.sparsifier)
        instantiate(model)                     timm model (dense)
        instantiate(sparsifier)                the method, built from its config objects
        method.apply_(model)                   sparsify once, here -> the sparse model and its report
    build_trainer(cfg, model, method, ...)     optimizer factory, lr schedule, TrainerConfig -> Trainer
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dynadiag import distributed as dist_utils
from dynadiag.checkpoint import CheckpointError
from dynadiag.data import DataBundle, DataConfig, build_loaders
from dynadiag.kernels import BackendUnavailableError, autotune, backend_names, get_backend
from dynadiag.loggers import Logger, build_logger
from dynadiag.methods.base import SparseMethod
from dynadiag.trainer import Trainer

__all__ = [
    "CONFIG_DIR",
    "USER_ERRORS",
    "build_data",
    "build_run_logger",
    "build_sparse_model",
    "build_trainer",
    "check_group_overrides",
    "configure_autotune",
    "error_message",
    "group_choices",
    "is_multirun",
    "resolve_device",
    "run_dir",
    "run_job",
    "seed_everything",
    "upgrade_sparsifier_config",
    "validate_backend",
    "validate_config",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: what a user can get wrong in a config; printed as one ``error: ...`` line (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, BackendUnavailableError, FloatingPointError)


# ------------------------------------------------------------------------------------------------ errors and CLI
def error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, looking through Hydra's instantiate wrappers; None otherwise."""
    seen = exc
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return str(seen).splitlines()[0] if str(seen) else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


def run_job(job: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """Run an entry script's job; a user error ends the process with one ``error: ...`` line and exit status 2.

    Anything else (a bug) keeps its traceback.
    """
    try:
        return job(cfg)
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def check_group_overrides(args: list[str], config_dir: str = CONFIG_DIR) -> str | None:
    """One line naming an unknown config-group option on the command line (``model=vit_zz``) and listing the
    choices, or None. Hydra's own error spans many lines; this runs before it."""
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


# ------------------------------------------------------------------------------------------ run-level settings
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device(name)


def validate_backend(backend: str, device: torch.device) -> None:
    """An unknown backend, or an explicit one that cannot run on ``device``, is one clear ``ValueError``."""
    if backend not in backend_names():
        raise ValueError(f"unknown backend '{backend}'; choose one of {backend_names()}")
    if backend != "auto":
        get_backend(backend, device)  # raises with the list of backends available on this device


def configure_autotune(value: Any) -> None:
    """``autotune``: ``true``/``false`` switches ``auto``'s measured kernel choice on/off for the run; ``null`` leaves
    it to ``$DYNADIAG_AUTOTUNE`` (default on)."""
    if value is None:
        return
    if not isinstance(value, bool):
        raise ValueError(f"autotune must be true, false or null, got {value!r}")
    autotune.set_enabled(value)


def validate_config(cfg: DictConfig) -> torch.device:
    """Check the run-level values (those no library object owns) before anything is built.

    The sparsifier's own knobs (sparsity, temperatures, freeze point, ...) are checked by the objects they
    configure, when they are instantiated.

    Returns:
        The device to train on.
    """
    device = resolve_device(str(cfg.device))
    validate_backend(str(cfg.backend), device)
    configure_autotune(cfg.get("autotune"))
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def group_choices() -> dict[str, str]:
    """Which option of each config group was chosen (empty outside a Hydra app)."""
    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_dir(given: str | None = None) -> str:
    """``given``, else Hydra's output directory, else the working directory (outside a Hydra app)."""
    if given is not None:
        return given
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()


# -------------------------------------------------------------------------------------------------- builders
def build_data(data: Mapping[str, Any], seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Loaders for this rank from the ``data`` config node.

    ``data.batch_size`` is the *global* batch: each rank loads its share, so the steps per epoch, the schedules
    and the optimisation do not depend on the number of ranks (:func:`validate_config` checked the division).
    """
    config: DataConfig = instantiate(data, _convert_="all")
    config.batch_size //= world_size
    return build_loaders(config, seed=seed, rank=rank, world_size=world_size)


def build_sparse_model(model: Mapping[str, Any], sparsifier: Mapping[str, Any]) -> tuple[nn.Module, SparseMethod, Any]:
    """The model, already made sparse by its method, the method, and the method's sparsify report.

    The method is applied here, once, before any optimizer exists; the trainer (and ``eval.py``, which loads
    a checkpoint into the result) receive the sparse model.
    """
    net = instantiate(model, _convert_="all")
    method = instantiate(sparsifier, _convert_="all")
    report = method.apply_(net)
    return net, method, report


def upgrade_sparsifier_config(sparsifier: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run's ``sparsifier`` node in today's layout (a copy; other methods' nodes are returned as they are).

    ``sparsifier=sparse_dynadiag`` kept its layer options (sparsity, include, exclude, backend) at the top level until
    they moved into a nested ``config:`` node (a ``DiagSparsifyConfig``, as for dynadiag and diag_heur); checkpoints
    saved before that are rebuilt with them nested.
    """
    node = dict(sparsifier)
    if str(node.get("_target_", "")).endswith(".SparseDynaDiagMethod") and "config" not in node:
        config: dict[str, Any] = {"_target_": "dynadiag.sparsify.DiagSparsifyConfig"}
        for key in ("sparsity", "include", "exclude", "backend"):
            if key in node:
                config[key] = node.pop(key)
        node["config"] = config
    return node


def build_run_logger(
    logger: Mapping[str, Any], directory: str, name: str, config: dict[str, Any], group: str | None = None
) -> Logger:
    """The metric sink of a run from the ``logger`` config node (``group`` overrides ``logger.group``)."""
    return build_logger(
        directory,
        list(logger["backends"]),
        project=logger["project"],
        name=name,
        group=group if group is not None else logger["group"],
        mode=logger["mode"],
        entity=logger["entity"],
        tags=list(logger["tags"]),
        config=config,
    )


def build_trainer(
    cfg: Mapping[str, Any],
    model: nn.Module,
    method: SparseMethod,
    data: DataBundle,
    device: torch.device,
    directory: str,
    logger: Logger,
    resolved: dict[str, Any],
    info: dict[str, Any],
    seed: int | None = None,
) -> Trainer:
    """A :class:`~dynadiag.trainer.Trainer` for a sparse model, from the ``optim``, ``lr_schedule`` and
    ``trainer`` config nodes (``seed``: the run's seed, for the per-rank random streams under DDP)."""
    return Trainer(
        model,
        method,
        instantiate(cfg["optim"], _convert_="all"),
        instantiate(cfg["lr_schedule"], _convert_="all"),
        data,
        instantiate(cfg["trainer"], _convert_="all"),
        device,
        directory,
        logger=logger,
        run_config=resolved,
        info=info,
        seed=seed,
    )
