import subprocess
import sys
import textwrap

import pytest

from dynadiag.extras import require

EXTRAS = ("hydra", "hydra_plugins", "omegaconf", "submitit", "wandb", "sklearn", "matplotlib", "onnx", "onnxruntime")
EXTRAS += ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_require_names_the_extra():
    assert require("json", "json", "a test").dumps([1]) == "[1]"
    with pytest.raises(ImportError, match=r"the thing needs not-a-package .*pip install 'dynadiag\[train\]'"):
        require("not_a_module_dynadiag", "not-a-package", "the thing")


def test_core_modules_import_without_the_extras():
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        for name in {EXTRAS!r}:
            sys.modules[name] = None  # hidden: import fails, find_spec reports it missing
        import dynadiag
        for info in pkgutil.walk_packages(dynadiag.__path__, "dynadiag."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:  # an integration module may need its framework: allowed
                missing = (exc.name or "").split(".")[0]
                assert missing and missing not in {EXTRAS!r}, f"{{info.name}} imports {{missing}} at import time"
        from dynadiag.data import DataConfig, build_datasets
        from dynadiag.loggers import WandbLogger
        calls = (lambda: build_datasets(DataConfig(name="digits")), lambda: WandbLogger(".", project="p", name="n"))
        for call in calls:
            try:
                call()
            except ImportError as exc:
                assert "pip install 'dynadiag[train]'" in str(exc), exc
            else:
                raise AssertionError("ran with its extra hidden")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
