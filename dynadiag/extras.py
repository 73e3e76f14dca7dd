"""Optional dependencies: the core package needs torch and timm only; the training framework's extras are imported
where they are used, through :func:`require`, so a missing one fails with the ``pip install`` line that adds it.

Extras (``pyproject.toml``): ``train`` (Hydra, submitit, W&B, scikit-learn, matplotlib, tqdm), ``onnx`` (ONNX export),
``triton``, ``dev`` (``train`` + ``onnx`` + the test tools).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, package: str, what: str, extra: str = "train") -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the package and the extra that installs it.

    Args:
        module: the module to import, e.g. ``"sklearn.datasets"``.
        package: the distribution that provides it, e.g. ``"scikit-learn"``.
        what: the feature that needs it, for the message (``"the digits data set"``).
        extra: the ``dynadiag`` extra that installs the package.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {package} (not installed): pip install 'dynadiag[{extra}]' or pip install {package}"
        ) from None
