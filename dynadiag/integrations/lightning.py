"""A Lightning ``Callback`` that trains the ``LightningModule`` with a sparse-training method (``dynadiag[lightning]``).

::

    trainer = L.Trainer(max_epochs=10, callbacks=[DynaDiagCallback(DiagSparsifyConfig(sparsity=0.9))])
    trainer.fit(module, loader)

Where each part runs:

- ``setup("fit")``: ``method.apply_(module)``, before Lightning calls ``configure_optimizers``, so the optimizer is
  built on the sparse layers;
- ``on_train_start``: :func:`~dynadiag.integrations.loop.attach` to the first optimizer, over
  ``trainer.estimated_stepping_batches`` optimizer steps (accumulation and ``max_steps`` included);
- ``on_before_optimizer_step``: the method's ``on_after_backward``. Lightning passes a closure to
  ``optimizer.step`` (the backward pass runs inside the step, after the optimizer's pre-hooks), so this hook, which
  follows the backward pass and precedes gradient clipping, is the place; the step post-hook does the rest.

The method's state and step are saved in Lightning checkpoints (``state_dict`` / ``load_state_dict``). The freeze
replaces parameters once: the optimizer follows, a multi-process strategy's wrapper (DDP) does not, so under DDP
use ``SparseDynaDiagMethod(..., freeze_fraction=1.0)`` (no freeze during ``fit``) and freeze afterwards with
:func:`dynadiag.methods.dynadiag.freeze_all_`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from dynadiag.integrations.loop import AttachedMethod, attach
from dynadiag.methods.base import SparseMethod
from dynadiag.sparsify import DiagSparsifyConfig

__all__ = ["DynaDiagCallback"]  # noqa: F822 (built by __getattr__ on first use)


def lightning_module() -> ModuleType:
    """``lightning.pytorch``, else the standalone ``pytorch_lightning``; a clear ``ImportError`` without either."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError("DynaDiagCallback needs Lightning: pip install 'dynadiag[lightning]'") from None
    return pl


def __getattr__(name: str) -> Any:
    # The callback subclasses Lightning's Callback, so it is built on first use: this module imports without Lightning.
    if name == "DynaDiagCallback":
        cls = type(name, (_DynaDiagCallback, lightning_module().Callback), {"__doc__": _DynaDiagCallback.__doc__})
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    if name == "pl":
        return lightning_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DynaDiagCallback:
    """Sparsify and train a ``LightningModule`` with ``method`` (see the module docstring).

    Args:
        method: any :class:`~dynadiag.methods.base.SparseMethod`, or a :class:`~dynadiag.DiagSparsifyConfig` for
            sparse DynaDiag with its defaults.
        total_steps: optimizer steps of the run (default: ``trainer.estimated_stepping_batches``).
        log_metrics: log the method's metrics (temperature, frozen, ...) with ``pl_module.log_dict`` every step.
    """

    def __init__(
        self, method: SparseMethod | DiagSparsifyConfig, total_steps: int | None = None, log_metrics: bool = True
    ) -> None:
        super().__init__()
        if isinstance(method, DiagSparsifyConfig):
            from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod

            method = SparseDynaDiagMethod(method)
        self.method, self.total_steps, self.log_metrics = method, total_steps, log_metrics
        self.attached: AttachedMethod | None = None
        self._applied = False
        self._state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and not self._applied:
            self.method.apply_(pl_module)
            self._applied = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = int(self.total_steps or trainer.estimated_stepping_batches)
        epochs = max(1, trainer.max_epochs or 1)
        self.attached = attach(
            pl_module, trainer.optimizers[0], self.method, total, max(1, total // epochs), apply=False,
            step_pre_hook=False,
        )  # fmt: skip
        if self._state is not None:
            self.attached.load_state_dict(self._state)
            self._state = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.attached is not None:
            self.attached.after_backward()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.log_metrics and self.attached is not None and self.attached.metrics:
            pl_module.log_dict({f"sparse/{k}": float(v) for k, v in self.attached.metrics.items()})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.attached is not None:
            self.attached.detach()

    def state_dict(self) -> dict[str, Any]:
        return self.attached.state_dict() if self.attached is not None else dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = dict(state_dict) or None
