"""One home for the SDK's file writes and canonical JSON.

Every file the SDK writes (checkpoints, result files, merged-model specs, materialized merges, the
embedded repository's cache) is written atomically: a temp file in the same folder (created user-only),
fsync, rename. A reader, or a run killed mid-write, sees the old file or the new one, never half of one.

A killed write leaves its temp file (`.<name>.<random>.tmp`) behind: the next write of the same file
removes those older than `STALE_SECONDS` (younger ones may belong to a writer still running), and a
server that owns a folder sweeps it when it starts (`remove_stale_temps`). A write that fails (disk full,
quota, read-only) is a `StorageError` naming the file, and leaves no temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Any

from .errors import StorageError

__all__ = [
    "STALE_SECONDS",
    "canonical_json",
    "remove_stale_temps",
    "write_atomic",
    "write_json_atomic",
    "write_npz_atomic",
]

STALE_SECONDS = 60.0
"""A temp file of ours this old has no writer left (a write takes milliseconds to seconds)."""


def remove_stale_temps(folder: Path, name: str = "*", *, older_than: float = STALE_SECONDS) -> int:
    """Remove the temp files killed writes of `name` (a glob; every file by default) left in `folder`,
    if older than `older_than` seconds; returns how many. Errors are ignored: this is tidying."""
    removed = 0
    cutoff = time.time() - older_than
    with contextlib.suppress(OSError):
        for tmp in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime <= cutoff:
                    tmp.unlink()
                    removed += 1
    return removed


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through `write` so that readers see the old file or the new one, never half of either;
    the file is readable by the user only (mkstemp creates it 0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, glob_escape(path.name))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):  # ENOSPC, EDQUOT, EFBIG, EROFS
            raise StorageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write strict JSON (no NaN or infinity: a ValueError instead) atomically."""
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))


def write_npz_atomic(path: Path, meta: Mapping[str, Any] | str, arrays: Mapping[str, Any]) -> None:
    """Write numpy arrays and a JSON `meta` entry as one .npz atomically (`meta` may be JSON text)."""
    import numpy as np  # here: the package root, which reads canonical_json, stays free of numpy

    text = meta if isinstance(meta, str) else json.dumps(meta)
    write_atomic(path, lambda fh: np.savez(fh, meta=np.array(text), **arrays))


# Built once: json.dumps with options builds a new encoder per call, and cache keys are hot.
_LENIENT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
_STRICT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any, *, strict: bool = False) -> str:
    """One serialisation for keys and hashes: sorted keys, no spaces, text as it is. Equal values give
    equal strings. `strict` refuses what JSON cannot hold (NaN, objects) with a ValueError/TypeError;
    otherwise an unknown object is written as its `str`."""
    return (_STRICT if strict else _LENIENT).encode(value)
