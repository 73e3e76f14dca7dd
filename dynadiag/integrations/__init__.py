"""Use the sparse-training methods outside the project's trainer.

- :func:`attach` (:mod:`dynadiag.integrations.loop`): any PyTorch loop, through optimizer hooks;
- :mod:`dynadiag.integrations.lightning`: a Lightning ``Callback`` (needs ``pytorch-lightning``);
- :mod:`dynadiag.integrations.hf`: a Hugging Face ``TrainerCallback`` (needs ``transformers``).

The framework modules are imported only when asked for, so the core install needs neither framework.
"""

from dynadiag.integrations.loop import AttachedMethod, attach, repoint_optimizer_

__all__ = ["AttachedMethod", "attach", "repoint_optimizer_"]
