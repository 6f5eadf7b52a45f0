"""Run numpy's OpenBLAS single-threaded for the duration of a block.

The embedded repository multiplies small matrices (tens to a few hundred rows and columns). OpenBLAS
splits such products over threads that busy-wait for each other; when another process keeps a core busy
the waiting dominates: on the 2-core reference machine, pre-training ran 10x slower with two BLAS threads
than with one. One thread is as fast on an idle machine at these sizes, so build and evaluation limit
OpenBLAS to one thread while they run and restore the previous count afterwards.

Without numpy's bundled OpenBLAS (MKL, Accelerate, another build) this is a no-op. Set
`EVOMERGE_BLAS_THREADS=0` to leave BLAS threading alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["single_threaded_blas"]

_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")

_lock = threading.Lock()
_depth = 0
_saved = 0
_api: tuple[Callable[[int], None], Callable[[], int]] | None = None
_api_loaded = False


def _candidate_libraries() -> list[Path]:
    root = Path(np.__file__).resolve().parent
    found: list[Path] = []
    for folder in (root.parent / "numpy.libs", root / ".dylibs", root / "_core"):
        if folder.is_dir():
            found.extend(sorted(p for p in folder.iterdir() if "openblas" in p.name.lower()))
    return found


def _load_api() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for set_name, get_name in zip(_SETTERS, _GETTERS, strict=True):
            setter = getattr(lib, set_name, None)
            getter = getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                getter.argtypes = []
                getter.restype = ctypes.c_int
                return setter, getter
    return None


def _get_api() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    global _api, _api_loaded
    if not _api_loaded:
        _api_loaded = True
        if os.environ.get("EVOMERGE_BLAS_THREADS", "1") != "0":
            _api = _load_api()
    return _api


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit OpenBLAS to one thread inside the block; nested and concurrent blocks share one setting."""
    global _depth, _saved
    with _lock:
        api = _get_api()
        if api is not None and _depth == 0:
            _saved = api[1]()
            api[0](1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if api is not None and _depth == 0:
                api[0](_saved)
