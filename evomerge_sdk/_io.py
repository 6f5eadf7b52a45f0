"""One home for the SDK's file writes and canonical JSON.

Every file the SDK writes (checkpoints, result files, merged-model specs, materialized merges, the
embedded repository's cache) is written atomically: a temp file in the same folder (created user-only),
fsync, rename. A reader, or a run killed mid-write, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["canonical_json", "write_atomic", "write_json_atomic", "write_npz_atomic"]


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through `write` so that readers see the old file or the new one, never half of either;
    the file is readable by the user only (mkstemp creates it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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
