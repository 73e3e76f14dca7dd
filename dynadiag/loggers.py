"""Metric loggers behind one interface: a local JSON-lines file (always) and Weights & Biases (optional).

Only rank 0 builds real loggers (:func:`build_logger` returns a :class:`NullLogger` elsewhere). W&B runs
offline unless ``mode="online"`` is asked for, never prompts, and keeps its files inside the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from dynadiag import distributed as dist_utils
from dynadiag.extras import require

__all__ = ["JsonlLogger", "Logger", "MultiLogger", "NullLogger", "WandbLogger", "build_logger"]


def _plain(value: Any) -> Any:
    """Make ``value`` JSON-serialisable (tensors and numpy scalars become floats; NaN/inf become strings)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Logger:
    """Interface; the base class drops everything."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class NullLogger(Logger):
    """Used on non-zero ranks."""


class JsonlLogger(Logger):
    """Appends one JSON object per ``log`` call (``{"step": ..., "time": ..., <metrics>}``) to ``path``."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        # append: a resumed run continues the same file; closed in finish()
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": int(step), "time": round(time.time(), 3), **_plain(metrics)}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def finish(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class WandbLogger(Logger):
    """Weights & Biases run; ``mode`` is ``offline`` (default), ``online`` or ``disabled``."""

    def __init__(
        self,
        run_dir: str,
        project: str,
        name: str,
        group: str | None = None,
        mode: str = "offline",
        entity: str | None = None,
        tags: list[str] | None = None,
        config: dict[str, Any] | None = None,
        resume_id: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        wandb = require("wandb", "wandb", "the W&B logger (logger=wandb)")
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=tags,
            mode=mode,
            dir=run_dir,
            config=config,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_plain(metrics), step=int(step))

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in _plain(summary).items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_logger(
    run_dir: str,
    backends: list[str] | tuple[str, ...] = ("jsonl",),
    *,
    project: str = "dynadiag",
    name: str = "run",
    group: str | None = None,
    mode: str = "offline",
    entity: str | None = None,
    tags: list[str] | None = None,
    config: dict[str, Any] | None = None,
    resume_id: str | None = None,
) -> Logger:
    """Build the loggers for a run. ``metrics.jsonl`` in ``run_dir`` is always written (on rank 0).

    Args:
        run_dir: the run directory; W&B files go to ``run_dir/wandb``.
        backends: any of ``"jsonl"``, ``"wandb"``.
    """
    if not dist_utils.is_main_process():
        return NullLogger()
    unknown = set(backends) - {"jsonl", "wandb"}
    if unknown:
        raise ValueError(f"unknown logger backend(s) {sorted(unknown)}; choose from ['jsonl', 'wandb']")
    loggers: list[Logger] = [JsonlLogger(os.path.join(run_dir, "metrics.jsonl"))]
    if "wandb" in backends and mode != "disabled":
        loggers.append(WandbLogger(run_dir, project, name, group, mode, entity, tags, config, resume_id=resume_id))
    return MultiLogger(loggers)
