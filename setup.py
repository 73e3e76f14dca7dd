"""Packaging hook: ship the top-level ``csrc/`` (C++/CUDA sources, JIT-built on first use) in the wheel.

All metadata lives in ``pyproject.toml``. The sources stay at the repository's top level; building a wheel copies
them to ``dynadiag/csrc`` inside it, where :func:`dynadiag.kernels._build.source_dir` finds them with
``importlib.resources``. An editable install copies nothing: it reads the repository's ``csrc/`` directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCES = Path(__file__).resolve().parent / "csrc"


class BuildPyWithKernelSources(build_py):
    """``build_py`` that also places ``csrc/`` in the built package as ``dynadiag/csrc``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        shutil.copytree(SOURCES, Path(self.build_lib) / "dynadiag" / "csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
