"""Builds the CUDA C++ kernels in kernels/csrc as a torch extension.

Built lazily on first use (or ahead of time with ``python -m kernels.build``)
into a persistent cache keyed by the sources, torch's version and the target
architectures, so a rebuild happens only when one of them changes.  Targets
Hopper (sm_90) and Ampere (sm_80, which also runs on Ada) unless
``TORCH_CUDA_ARCH_LIST`` says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["SOURCES", "ARCHS", "build_dir", "load_extension", "extension_or_none"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "paged_attention.cu",)
ARCHS = "8.0;9.0"
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; an unactivated venv's ninja (the PyPI
    wheel, a dependency) is not on it, so add its directory when none is."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_dir() -> Path:
    """Where the extension is built: ``$DSSTREAM_CACHE`` or ~/.cache/dsstream, then a key."""
    root = Path(os.environ.get("DSSTREAM_CACHE", Path.home() / ".cache" / "dsstream"))
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(os.environ.get("TORCH_CUDA_ARCH_LIST", ARCHS).encode())
    return root / "kernels" / digest.hexdigest()[:16]


def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first time) and import the extension; a clear error if it cannot be built."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        home = _cuda_home()
        if home is None:
            _error = "the CUDA kernels need nvcc: set CUDA_HOME to a CUDA toolkit"
            raise RuntimeError(_error)
        _put_ninja_on_path()
        os.environ.setdefault("CUDA_HOME", home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ARCHS)
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = home  # read at import, before CUDA_HOME may have been set
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        try:
            _module = cpp_extension.load(
                name="dsstream_kernels",
                sources=[str(s) for s in SOURCES],
                build_directory=str(out),
                extra_cuda_cflags=["-O3", "--use_fast_math"],
                verbose=verbose,
            )
        except Exception as exc:  # compiler output is in the exception
            _error = f"building the CUDA kernels failed: {exc}"
            raise RuntimeError(_error) from exc
        return _module


def extension_or_none(op: str) -> ModuleType | None:
    """The extension, or None after one warning naming ``op`` and the reason."""
    from kernels._dispatch import warn_once

    try:
        return load_extension()
    except RuntimeError as exc:
        warn_once(f"{op}:cuda", f"{op}: {exc}; using the plain-torch reference")
        return None
