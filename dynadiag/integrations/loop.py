"""Drive a sparse-training method from any training loop: :func:`attach` hooks the optimizer.

A :class:`~dynadiag.methods.base.SparseMethod` has three per-step hooks (:mod:`dynadiag.methods.base`). The
project's trainer calls them at three exact points of its step; any other loop gets them from the optimizer::

    method = dynadiag.attach(model, optimizer, DiagSparsifyConfig(sparsity=0.9), total_steps=len(loader) * epochs)
    for x, y in loader:                      # the loop itself is unchanged
        loss_fn(model(x), y).backward()
        optimizer.step()                     # the method's hooks run inside this call
        optimizer.zero_grad()

Where each hook runs:

- ``on_step_start(s)``: at :func:`attach` for the first step, then right after the previous step's
  ``on_after_optimizer_step`` (so before the forward passes of step ``s``);
- ``on_after_backward(s)``: in an optimizer *step pre-hook*, i.e. after the backward passes, gradient unscaling and
  clipping, right before the update;
- ``on_after_optimizer_step(s)``: in an optimizer *step post-hook*.

The hooks fire on real optimizer steps only, so gradient accumulation (several backward passes per step) and
``GradScaler`` (whose ``scaler.step`` unscales, then calls ``optimizer.step`` unless the gradients overflowed) need
nothing extra, and one call that does backward, clipping and step (timm's ``NativeScaler``) is covered too. The
method's step counter counts *applied* updates: an fp16 step skipped for an overflow does not advance it.

Methods that read the dense gradient of a masked weight (RigL, SET, SRigL, GMP: :class:`MaskedMethod`) get it from a
tensor hook on each masked weight, which keeps the dense gradient for the method and hands autograd the masked one,
so clipping sees exactly the gradients the update uses (as in the trainer, which masks before it clips). The
diagonal methods that grow by the dense gradient (DiagHeur, sparse DynaDiag) capture it with their own forward and
output-gradient hooks, armed by ``on_step_start`` on update steps; micro-batches add up.

**Parameters that change.** DynaDiag's freeze shrinks each layer's ``V`` once (and sparse DynaDiag with
``stable_params=False`` replaces ``V`` at every candidate update). The optimizer passed here is kept consistent
(state carried row by row); anything else holding parameters (DDP, ``torch.compile``, an EMA copy, a second
optimizer) must be rebuilt: register a function with :meth:`AttachedMethod.on_topology_change`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynadiag.methods.base import SparseMethod
from dynadiag.methods.masks import MaskedMethod
from dynadiag.sparsify import DiagSparsifyConfig
from dynadiag.sparsity import MASK_BUFFER

__all__ = ["AttachedMethod", "attach", "repoint_optimizer_"]


class AttachedMethod:
    """A method bound to a model and an optimizer through hooks; made by :func:`attach`.

    Attributes:
        method: the sparse-training method.
        model: the model it sparsified.
        optimizer: the optimizer whose steps drive it.
        step: optimizer steps applied so far (the method's global step).
        metrics: what the hooks reported for the last applied step (e.g. ``temperature``, ``frozen``), for your
            logger.
    """

    def __init__(
        self,
        method: SparseMethod,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        bound: bool = True,
        step_pre_hook: bool = True,
    ) -> None:
        self.method, self.model, self.optimizer = method, model, optimizer
        self.step = 0
        self.bound = bound
        self.metrics: dict[str, float] = {}
        self._callbacks: list[Callable[[nn.Module], Any]] = []
        self._dense_grads: dict[int, torch.Tensor] = {}  # id(weight) -> dense gradient of a masked weight
        self._handles = [optimizer.register_step_post_hook(self._post_step)]
        if step_pre_hook:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        if isinstance(method, MaskedMethod):
            # keep the dense gradient only for a method that reads it (RigL-style growth; not SET or a static mask)
            keep_dense = type(method).capture is not MaskedMethod.capture
            for _, module in method.layers:
                self._handles.append(module.weight.register_hook(self._mask_hook(module, keep_dense)))
        self._pending = dict(method.on_step_start(self.step, model))  # metrics of the step in progress

    # ------------------------------------------------------------------ public
    def bind(self, total_steps: int, steps_per_epoch: int = 1) -> None:
        """Lay the method's schedules over ``total_steps`` optimizer steps (when :func:`attach` was called without
        them, e.g. in timm's ``train.py``, which knows the number of updates only once the loaders exist)."""
        if int(total_steps) < 1:
            raise ValueError(f"attach: total_steps must be >= 1, got {total_steps}")
        self.method.bind(steps_per_epoch, int(total_steps))
        self.bound = True
        self._pending = dict(self.method.on_step_start(self.step, self.model))  # the schedules moved

    def on_topology_change(self, fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
        """Call ``fn(model)`` after every step that replaced parameters (the freeze, a candidate update with
        ``stable_params=False``): rebuild DDP / ``torch.compile`` wrappers, EMA copies or other optimizers there.
        Returns ``fn``, so it works as a decorator."""
        self._callbacks.append(fn)
        return fn

    def state_dict(self) -> dict[str, Any]:
        """The step and the method's own state (save it beside the model's and the optimizer's)."""
        return {"step": self.step, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]`` (load the model and optimizer states first)."""
        self.step = int(state["step"])
        self.method.load_state_dict(state.get("method") or {})
        self._pending = dict(self.method.on_step_start(self.step, self.model))

    def detach(self) -> None:
        """Remove every hook; the model keeps its current (sparse) layers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _mask_hook(self, module: nn.Module, keep_dense: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        key = id(module.weight)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if keep_dense:
                held = self._dense_grads.get(key)
                self._dense_grads[key] = grad if held is None else held + grad  # micro-batches add up
            return grad * getattr(module, MASK_BUFFER)

        return hook

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.after_backward()

    def after_backward(self) -> None:
        """Run the method's ``on_after_backward`` now: the optimizer's step pre-hook does this, unless
        :func:`attach` was called with ``step_pre_hook=False`` (a loop that passes a closure to ``optimizer.step``,
        which runs the backward pass *inside* the step, after the pre-hooks: Lightning calls this from its
        ``on_before_optimizer_step``)."""
        optimizer = self.optimizer
        if not self.bound:
            raise RuntimeError("dynadiag.attach: call .bind(total_steps, steps_per_epoch) before the first step")
        if not self._dense_grads:
            self._pending |= self.method.on_after_backward(self.step, self.model, optimizer)
            return
        # A masked method reads the dense gradients in on_after_backward and masks them; the update uses the
        # gradients autograd accumulated (masked by the tensor hooks, then unscaled and clipped by the loop).
        masked = []
        for _, module in self.method.layers:
            dense = self._dense_grads.get(id(module.weight))
            if dense is not None:
                masked.append((module.weight, module.weight.grad))
                module.weight.grad = dense
        try:
            self._pending |= self.method.on_after_backward(self.step, self.model, optimizer)
        finally:
            for weight, grad in masked:
                weight.grad = grad
            self._dense_grads = {}

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.metrics = self._pending | self.method.on_after_optimizer_step(self.step, self.model, optimizer)
        if self.method.topology_changed:
            self.method.topology_changed = False
            for fn in self._callbacks:
                fn(self.model)
        self.step += 1
        self._pending = dict(self.method.on_step_start(self.step, self.model))


def repoint_optimizer_(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], model: nn.Module) -> int:
    """Move ``optimizer`` from the parameters a method replaced to the ones that replaced them.

    ``before`` maps names to the parameters the model had when the optimizer was built. A parameter the model no
    longer has leaves its group; the new parameters of the same module join that group (a 1-D one joins the group
    of the old module's 1-D parameter, e.g. its bias, when there is one: no weight decay, as timm's factory does).

    Returns:
        How many new parameters joined the optimizer.

    Raises:
        ValueError: a replaced parameter has no new parameter in its module to take its place.
    """
    after = dict(model.named_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    alive = {id(p) for p in after.values()}
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    gone: dict[str, list[tuple[nn.Parameter, dict]]] = {}  # module name -> [(old param, its group)]
    for name, param in before.items():
        if id(param) in held and id(param) not in alive:
            gone.setdefault(name.rpartition(".")[0], []).append((param, group_of[id(param)]))
    added, filled = 0, set()
    for name, param in after.items():
        if id(param) in held:
            continue
        module = name.rpartition(".")[0]
        olds = gone.get(module)
        if not olds:
            continue  # a parameter the optimizer never held (e.g. a frozen module): left out, as before
        same_rank = [group for old, group in olds if (old.dim() == 1) == (param.dim() == 1)]
        group = same_rank[0] if same_rank else olds[0][1]
        group["params"].append(param)
        added += 1
        filled.add(module)
    for olds in gone.values():
        for old, group in olds:
            group["params"] = [p for p in group["params"] if p is not old]
            optimizer.state.pop(old, None)
    missing = sorted(set(gone) - filled)
    if missing:
        raise ValueError(f"attach: the method removed the parameters of {missing[0]!r} and put none to train there")
    return added


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: SparseMethod | DiagSparsifyConfig,
    total_steps: int | None = None,
    steps_per_epoch: int = 1,
    apply: bool = True,
    step_pre_hook: bool = True,
) -> AttachedMethod:
    """Sparsify ``model`` with ``method`` and drive the method from ``optimizer``'s steps.

    Args:
        model: the model (not wrapped in DDP or ``torch.compile`` yet: wrap it after this call).
        optimizer: the optimizer of ``model``, built before or after the method was applied: parameters the method
            replaces (an ``nn.Linear`` weight becoming diagonal values) are swapped in its groups.
        method: a :class:`~dynadiag.methods.base.SparseMethod` (any of :mod:`dynadiag.methods`), or a
            :class:`~dynadiag.DiagSparsifyConfig` for sparse DynaDiag with its defaults.
        total_steps: optimizer steps of the whole run (the freeze and the drop/grow schedule are laid over it);
            ``None``: call :meth:`AttachedMethod.bind` before the first step.
        steps_per_epoch: optimizer steps per epoch, for schedules configured in epochs (DynaDiag's temperature
            schedule, GMP); methods scheduled in fractions of the run ignore it.
        apply: ``False`` when ``method.apply_(model)`` was already called (e.g. before a checkpoint was loaded).
        step_pre_hook: run ``on_after_backward`` in the optimizer's step pre-hook; ``False`` for loops that call
            ``optimizer.step(closure)`` (call :meth:`AttachedMethod.after_backward` after the closure's backward).

    Returns:
        The :class:`AttachedMethod` (its ``step``, ``metrics``, ``state_dict``, ``on_topology_change``, ``detach``).
    """
    if isinstance(method, DiagSparsifyConfig):
        from dynadiag.methods.sparse_dynadiag import SparseDynaDiagMethod

        method = SparseDynaDiagMethod(method)
    if not isinstance(method, SparseMethod):
        raise TypeError(f"attach: method must be a SparseMethod or a DiagSparsifyConfig, got {type(method).__name__}")
    if total_steps is not None and int(total_steps) < 1:
        raise ValueError(f"attach: total_steps must be >= 1, got {total_steps}")
    if total_steps is not None:
        method.bind(steps_per_epoch, int(total_steps))
    if apply:
        before = dict(model.named_parameters())
        method.apply_(model)
        repoint_optimizer_(optimizer, before, model)
    return AttachedMethod(method, model, optimizer, bound=total_steps is not None, step_pre_hook=step_pre_hook)
