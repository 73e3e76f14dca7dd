"""An external reference row: the RigL of the third-party ``sparsimony`` library behind this project's method hooks.

The point is a comparison with an implementation this project did not write: the same model, data, optimizer and
layers, with sparsimony's own masking (``torch.nn.utils.parametrize``: the forward computes ``mask * original``),
dense-gradient capture (a backward hook on the parametrization), magnitude drop, gradient grow, cosine schedule and
sparse re-initialisation (its ``init_method``). Only the layer choice and the run length come from here.

``sparsimony`` is an optional dependency, imported when the method is applied. Its wheel pins ``numpy==1.*`` and
Python <= 3.12 although its RigL needs neither, so install it without dependencies::

    pip install --no-deps sparsimony==0.1.0

Differences of sparsimony 0.1.0 to this project's RigL that a reader should know (docs/baselines.md): it does not
reset Adam's moments of grown weights (only SGD momentum), its ``grad_flow`` init draws kept weights from
``N(0, std = 2 / fan_in)`` (a standard deviation, not a variance), and its first update grows with the gradient
summed over the first ``delta_t`` steps. Checkpoints of a run with this method are not meant to be resumed.
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag.methods.base import SparseMethod
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.targets import select_layers

__all__ = ["SparsimonyRigLMethod"]

INSTALL_HINT = "pip install --no-deps sparsimony==0.1.0"


class SparsimonyRigLMethod(SparseMethod):
    """sparsimony's ``RigL`` sparsifier on the layers :class:`~dynadiag.methods.masks.MaskedMethod` would mask.

    Args:
        config: which layers are sparsified, and how sparse (``distribution``: ``uniform`` or ``erk``; ``init`` is
            ignored: sparsimony re-initialises with ``init_method``).
        delta_t: optimizer steps between updates (ignored when ``num_updates`` is set).
        drop_fraction: sparsimony's ``pruning_ratio`` at the first update, decayed by cosine to ``t_end``.
        t_end: fraction of the run after which the topology stays fixed.
        num_updates: if set, updates spread evenly over ``[0, t_end)`` as in :class:`~.regrow.RegrowSchedule`.
        init_method: sparsimony's re-initialisation of the kept weights (``grad_flow``, its default, or ``None``).
        seed: seeds the initial random masks (sparsimony draws them from torch's global generator).
    """

    name = "sparsimony_rigl"

    def __init__(
        self,
        config: MaskSparsifyConfig,
        delta_t: int = 100,
        drop_fraction: float = 0.3,
        t_end: float = 0.75,
        num_updates: int | None = None,
        init_method: str | None = "grad_flow",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config, self.sparsity = config, config.sparsity
        self.delta_t, self.drop_fraction, self.t_end = int(delta_t), float(drop_fraction), float(t_end)
        self.num_updates, self.init_method, self.seed = num_updates, init_method, int(seed)
        self.layers: list[tuple[str, nn.Module]] = []
        self.sparsifier = None
        self._updates = 0

    def interval(self) -> int:
        """Steps between updates (sparsimony counts its ``step()`` calls, one per optimizer step); with
        ``num_updates``, ``ceil(t_end * total_steps / (num_updates + 1))``, i.e. at most ``num_updates`` updates."""
        end = int(self.t_end * self.total_steps)
        if self.num_updates is None:
            return self.delta_t
        return max(1, -(-end // (int(self.num_updates) + 1)))

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        """Set the run length; the trainer binds after ``apply_``, so an existing scheduler is updated too."""
        super().bind(steps_per_epoch, total_steps)
        if self.sparsifier is not None:
            self.sparsifier.scheduler.t_end = int(self.t_end * self.total_steps)
            self.sparsifier.scheduler.delta_t = self.interval()

    def apply_(self, model: nn.Module) -> str:
        try:
            from sparsimony.distributions.base import ERKDistribution, UniformDistribution
            from sparsimony.dst.rigl import RigL
            from sparsimony.schedulers.base import CosineDecayScheduler
        except ImportError as error:
            raise ImportError(f"sparsifier=sparsimony_rigl needs sparsimony: {INSTALL_HINT} ({error})") from None
        cfg = self.config
        types = (nn.Linear, nn.Conv2d) if cfg.convs else (nn.Linear,)
        self.layers = select_layers(
            model, cfg.include, cfg.exclude, types=types, first_layer=cfg.first_layer, head=cfg.head
        )
        distribution = {"uniform": UniformDistribution, "erk": ERKDistribution}[cfg.distribution]()
        scheduler = CosineDecayScheduler(self.drop_fraction, int(self.t_end * self.total_steps), self.interval())
        # sparsimony wraps optimizer.step to zero SGD momentum of masked weights; the trainer's optimizer does not
        # exist yet (it must see the parametrized ``original`` weights), so it gets a placeholder until then.
        placeholder = torch.optim.SGD([torch.zeros(1)], lr=0.0)
        self.sparsifier = RigL(
            scheduler, distribution, placeholder, sparsity=self.sparsity, init_method=self.init_method
        )
        rng = torch.get_rng_state()
        torch.manual_seed(self.seed)
        self.sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name, _ in self.layers])
        torch.set_rng_state(rng)
        return f"{self.name}: {len(self.layers)} layers at {self.effective_density():.4f} density (sparsimony RigL)"

    @torch.no_grad()
    def effective_density(self) -> float:
        """Fraction of non-zeros in the weights the forward pass uses (``mask * original``) over the layers."""
        nnz = sum(int(torch.count_nonzero(module.weight)) for _, module in self.layers)
        return nnz / max(1, sum(module.weight.numel() for _, module in self.layers))

    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        if self.sparsifier.optimizer is not optimizer:
            self.sparsifier.optimizer = optimizer
        if not self.sparsifier.step():
            return {"sparsity/effective_masked": 1.0 - self.effective_density()} if step == 0 else {}
        self._updates += 1
        return {
            f"{self.name}/updates": float(self._updates),
            "sparsity/effective_masked": 1.0 - self.effective_density(),
        }
