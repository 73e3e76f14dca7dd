"""JIT build of the C++/CUDA extensions, cached across runs and safe under parallel processes.

``load_extension`` wraps :func:`torch.utils.cpp_extension.load` (ninja) with three things it lacks:

- a stable build directory keyed by a hash of the sources (and the headers next to them), the flags, the
  torch version, the compiler and, for ``-march=native`` builds, the CPU's feature flags, so a second process
  loads the cached library without invoking ninja or the compiler;
- an ``fcntl`` file lock, so pytest-xdist workers or DDP ranks building at once do not race;
- one error type, :class:`ExtensionBuildError`, that carries the compiler's output.

The sources include ``torch/library.h`` and ATen headers, not ``torch/extension.h`` (pybind11 + all of torch),
which keeps a cold build at seconds instead of tens of seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["ExtensionBuildError", "cache_root", "extension_dir", "find_cuda_home", "load_extension", "source_dir"]

_LOADED: dict[str, Path] = {}
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inl")


class ExtensionBuildError(RuntimeError):
    """Building or loading a JIT extension failed; the message holds the compiler's output."""


def source_dir() -> Path:
    """The C++/CUDA sources (``csrc/``).

    A wheel ships them as package data, ``dynadiag/csrc`` (``setup.py`` copies the top-level ``csrc/`` there at
    build time), found with :mod:`importlib.resources`; an editable install or a plain checkout reads the
    repository's ``csrc/`` next to the package.
    """
    packaged = importlib.resources.files("dynadiag") / "csrc"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "csrc"


def cache_root() -> Path:
    """Where built extensions live: ``$DYNADIAG_CACHE`` or ``$XDG_CACHE_HOME/dynadiag`` (``~/.cache/dynadiag``)."""
    if os.environ.get("DYNADIAG_CACHE"):
        return Path(os.environ["DYNADIAG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynadiag"


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: ``$CUDA_HOME``/``$CUDA_PATH``, else ``TOP`` from ``nvcc --dryrun``, else
    ``/usr/local/cuda``. The ``nvcc`` on PATH may be a wrapper script, so its own folder is not the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        probe = cache_root() / "nvcc_probe.cu"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(probe), "-o", os.devnull], capture_output=True, text=True, timeout=60
            )
            match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                return str(Path(match.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _cpp_extension():  # -> the torch.utils.cpp_extension module
    """``torch.utils.cpp_extension``, imported without its import-time "No CUDA runtime is found" warning.

    The warning concerns CUDA builds; on a machine without a GPU every CPU build printed it. A CUDA build on such a
    machine still fails loudly (:func:`_ensure_cuda_home`, nvcc's own errors).
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    if not torch.cuda.is_available():
        logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _ensure_cuda_home() -> str:
    home = find_cuda_home()
    if home is None:
        raise ExtensionBuildError("cannot find the CUDA toolkit: set CUDA_HOME or put nvcc on PATH")
    os.environ["CUDA_HOME"] = home
    cpp_extension = _cpp_extension()
    # cpp_extension resolves CUDA_HOME once at import time; keep it in sync with the toolkit we found.
    cpp_extension.CUDA_HOME = home
    return home


def _compiler_id(cuda: bool) -> str:
    ids = []
    for exe in [os.environ.get("CXX", "c++")] + (["nvcc"] if cuda else []):
        try:
            ids.append(subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError):
            ids.append(f"{exe}: missing")
    return "\n".join(ids)


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _fingerprint(name: str, sources: Sequence[Path], flags: Sequence[str], cuda: bool) -> str:
    digest = hashlib.sha256()
    files = set(sources)
    for folder in {s.parent for s in sources}:  # headers next to the sources (and one level up, e.g. csrc/)
        for base in (folder, folder.parent):
            files.update(p for p in base.glob("*") if p.suffix in _HEADER_SUFFIXES)
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(repr((name, list(flags), torch.__version__, torch.version.cuda if cuda else None)).encode())
    digest.update(_compiler_id(cuda).encode())
    if any("native" in f for f in flags):
        digest.update(_cpu_flags().encode())  # a -march=native binary is only valid on this kind of CPU
    return digest.hexdigest()[:16]


def extension_dir(
    name: str,
    sources: Sequence[str | os.PathLike],
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    cuda: bool = False,
) -> Path:
    """The cache folder an extension with these sources and flags builds into."""
    paths = [Path(s).resolve() for s in sources]
    flags = [*extra_cflags, "|", *extra_cuda_cflags, "|", *extra_ldflags]
    return cache_root() / f"{name}-{_fingerprint(name, paths, flags, cuda)}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(
    name: str,
    sources: Sequence[str | os.PathLike],
    extra_cflags: Sequence[str] = ("-O3", "-march=native", "-fopenmp"),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = ("-fopenmp",),
    cuda: bool = False,
    verbose: bool = False,
) -> Path:
    """Build (once, cached) and load a torch-op extension library into this process.

    The sources register their ops with ``TORCH_LIBRARY``/``TORCH_LIBRARY_IMPL``; nothing is imported as a
    Python module. Loading the same extension twice in one process is a no-op.

    Args:
        name: extension name (also the library's file name).
        sources: ``.cpp``/``.cu`` files. Headers in the same folders (and their parent) enter the cache key.
        extra_cflags: host compiler flags.
        extra_cuda_cflags: nvcc flags (``cuda=True`` only).
        extra_ldflags: linker flags.
        cuda: build with nvcc and link the CUDA runtime; sets ``CUDA_HOME`` if unset (see :func:`find_cuda_home`).
        verbose: echo the build commands.

    Returns:
        Path of the loaded shared library.

    Raises:
        ExtensionBuildError: the build or the load failed (message includes the compiler output).
    """
    if cuda:
        _ensure_cuda_home()
    build_dir = extension_dir(name, sources, extra_cflags, extra_cuda_cflags, extra_ldflags, cuda)
    key = str(build_dir)
    if key in _LOADED:
        return _LOADED[key]
    library = build_dir / f"{name}.so"
    done = build_dir / "BUILD_OK"
    with _file_lock(build_dir.parent / f"{build_dir.name}.lock"):
        try:
            if library.exists() and done.exists():
                torch.ops.load_library(str(library))
            else:
                build_dir.mkdir(parents=True, exist_ok=True)
                _cpp_extension().load(
                    name=name,
                    sources=[str(Path(s).resolve()) for s in sources],
                    extra_cflags=list(extra_cflags),
                    extra_cuda_cflags=list(extra_cuda_cflags) or None,
                    extra_ldflags=list(extra_ldflags),
                    build_directory=str(build_dir),
                    with_cuda=cuda,
                    is_python_module=False,
                    verbose=verbose,
                )
                done.write_text(f"{sys.version}\n{torch.__version__}\n")
        except Exception as exc:
            raise ExtensionBuildError(f"building/loading extension '{name}' in {build_dir} failed:\n{exc}") from exc
    _LOADED[key] = library
    return library
