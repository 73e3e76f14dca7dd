"""A Hugging Face ``TrainerCallback`` that trains the ``Trainer``'s model with a sparse method (``dynadiag[hf]``).

::

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DynaDiagHFCallback(config)])
    trainer.train()

Where each part runs:

- ``on_init_end`` (the end of ``Trainer.__init__``): ``method.apply_(model)``, so the optimizer, which the
  ``Trainer`` builds in ``train()``, holds the sparse layers;
- ``on_train_begin``: :func:`~dynadiag.integrations.loop.attach` to the optimizer (the torch optimizer inside
  Accelerate's wrapper) over ``state.max_steps`` optimizer steps. The ``Trainer`` clips, then calls
  ``optimizer.step()`` once per ``gradient_accumulation_steps`` micro-batches (through the gradient scaler under
  ``fp16``), so the optimizer's step hooks run the method as in any loop.

The method's metrics (``sparse/temperature``, ``sparse/frozen``, ...) join the ``logs`` of ``on_log``, so the callbacks
after this one see them; the ``Trainer`` puts its ``report_to`` callbacks (W&B, TensorBoard) *before* the ones passed
in, so to report them there move this one first: ``trainer.callback_handler.callbacks.insert(0,
trainer.pop_callback(callback))``.

The state of the callback (the method's step and state) is not part of the ``Trainer``'s checkpoints: to resume, save
``callback.attached.state_dict()`` beside them. The freeze replaces parameters once; the optimizer follows, a DDP
wrapper of a multi-process run does not (train with ``freeze_fraction=1.0`` there and freeze afterwards).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dynadiag.integrations.loop import AttachedMethod, attach
from dynadiag.methods.base import SparseMethod
from dynadiag.sparsify import DiagSparsifyConfig

__all__ = ["DynaDiagHFCallback"]  # noqa: F822 (built by __getattr__ on first use)


def __getattr__(name: str) -> Any:
    # The callback subclasses TrainerCallback, so it is built on first use: this module imports without transformers.
    if name == "DynaDiagHFCallback":
        try:
            from transformers import TrainerCallback
        except ImportError:
            raise ImportError("DynaDiagHFCallback needs transformers: pip install 'dynadiag[hf]'") from None
        cls = type(name, (_DynaDiagHFCallback, TrainerCallback), {"__doc__": _DynaDiagHFCallback.__doc__})
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DynaDiagHFCallback:
    """Sparsify and train a ``transformers.Trainer``'s model with ``method`` (see the module docstring).

    Args:
        method: any :class:`~dynadiag.methods.base.SparseMethod`, or a :class:`~dynadiag.DiagSparsifyConfig` for
            sparse DynaDiag with its defaults.
    """

    def __init__(self, method: SparseMethod | DiagSparsifyConfig) -> None:
        if isinstance(method, DiagSparsifyConfig):
            from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod

            method = SparseDynaDiagMethod(method)
        self.method = method
        self.attached: AttachedMethod | None = None
        self._model: nn.Module | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is None:
            raise ValueError("DynaDiagHFCallback: the Trainer has no model to sparsify")
        if self._model is not model:
            self.method.apply_(model)
            self._model = model

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
        if optimizer is None or self._model is None:
            raise ValueError("DynaDiagHFCallback: pass it to the Trainer(callbacks=[...]) that trains the model")
        epochs = max(1, round(float(args.num_train_epochs))) if args.max_steps <= 0 else 1
        total = max(1, int(state.max_steps))
        self.attached = attach(self._model, optimizer, self.method, total, max(1, total // epochs), apply=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs is not None and self.attached is not None:  # the method's metrics join the Trainer's logs
            logs.update({f"sparse/{k}": float(v) for k, v in self.attached.metrics.items()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.attached is not None:
            self.attached.detach()
