"""A merged model as data: its mode, pool, vectors and where its models live (`MergedSpec`), saved as
JSON (`save_spec`) and read back from that file or from a `result.json` of `evomerge demo` (`load_spec`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
from attrs.validators import optional
from numpy.typing import ArrayLike

from .._io import write_json_atomic
from .._validators import must
from ..engine._search import SearchResult
from ..errors import ConfigError
from ..objectives.output import MEAN_REFERENCE, AnswerSet, ScoringConfig

__all__ = ["MERGED_FORMAT", "MergedSpec", "load_spec", "save_spec"]

MERGED_FORMAT = "evomerge-sdk/merged-model"
_DEMO_FORMAT = "evomerge-sdk/demo-result"
_OUTPUT_DEMO_FORMAT = "evomerge-sdk/demo-output-result"


def _floats(values: ArrayLike) -> tuple[float, ...]:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("alpha and beta must be vectors of finite numbers") from None
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ConfigError("alpha and beta must be vectors of finite numbers")
    return tuple(float(v) for v in arr)


def _strings(values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"expected a list of names, got {values!r:.60}")
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"every name must be a non-empty string, got {list(values)!r:.80}")
    return tuple(values)


def _mapping(value: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"source must be a mapping, got {value!r:.60}")
    return dict(value)


_name = must(lambda v: isinstance(v, str) and bool(v), "{name} must be a non-empty string, got {value!r:.60}")


@attrs.frozen
class MergedSpec:
    """What a merged model is: its mode, pool, vectors and how to reach its models.

    `source` says where the models live: `{"kind": "embedded", "repository_seed", "pool_seed",
    "pool_size"}` (plus `"small_repository": true` for the test-sized one) for the embedded service
    (which `evomerge serve` starts itself), or `{"kind": "openai", "base_url"}` / `{"kind": "service",
    "base_url"}` for a running server.
    Output mode needs `answer_set` and `reference`; provider mode needs `preset_id`.
    """

    mode: Literal["output", "provider"] = attrs.field(
        validator=must(
            lambda v: v in ("output", "provider"), "mode must be 'output' or 'provider', got {value!r}"
        )
    )
    pool: tuple[str, ...] = attrs.field(converter=_strings)
    alpha: tuple[float, ...] = attrs.field(
        converter=_floats,
        validator=must(lambda v: all(0.0 <= a <= 1.0 for a in v), "alpha entries must lie in [0, 1]"),
    )
    beta: tuple[float, ...] = attrs.field(converter=_floats)
    source: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
    reference: str = attrs.field(default=MEAN_REFERENCE, validator=_name)
    answer_set: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    scoring: ScoringConfig = attrs.field(
        factory=ScoringConfig,
        validator=must(
            lambda v: isinstance(v, ScoringConfig),
            "scoring must be a ScoringConfig, got {value.__class__.__name__}",
        ),
    )
    preset_id: str | None = attrs.field(default=None, validator=optional(_name))
    name: str = attrs.field(default="evomerge-merged", validator=_name)

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants: one alpha and beta per pool model, and what each mode needs."""
        n = len(self.pool)
        if n == 0 or len(self.alpha) != n or len(self.beta) != n:
            raise ConfigError(
                f"a pool of {n} models needs as many alpha and beta entries "
                f"(got {len(self.alpha)} and {len(self.beta)})"
            )
        if self.mode == "output":
            AnswerSet(self.answer_set)  # validates
            if self.reference != MEAN_REFERENCE and self.reference in self.pool:
                raise ConfigError(f"the reference {self.reference!r} must not be a pool model")
        elif not self.preset_id:
            raise ConfigError("a provider-side merged model needs the preset_id of its pool")

    @classmethod
    def from_result(
        cls,
        result: SearchResult,
        pool: Sequence[str],
        *,
        answer_set: Sequence[str] = (),
        reference: str = MEAN_REFERENCE,
        scoring: ScoringConfig | None = None,
        base_url: str | None = None,
        preset_id: str | None = None,
        name: str = "evomerge-merged",
    ) -> MergedSpec:
        """The merged model a search found, in one call: output mode over `pool`'s models with
        `answer_set` and `reference` (and the `scoring` the search's scores were collected with), or,
        with `preset_id`, parameter mode over a merge service's pool. `base_url` records where the
        models live (an OpenAI-compatible `/v1` URL, or the merge service), so `evomerge serve` needs no
        `--base-url`."""
        if not isinstance(result, SearchResult):
            raise ConfigError(f"result must be a SearchResult, got {type(result).__name__}")
        output = preset_id is None
        source: dict[str, Any] = {}
        if base_url is not None:
            source = {"kind": "openai" if output else "service", "base_url": base_url}
        return cls(
            mode="output" if output else "provider",
            pool=pool,
            alpha=result.alpha,
            beta=result.beta,
            source=source,
            reference=reference,
            answer_set=answer_set,
            scoring=scoring if scoring is not None else ScoringConfig(),
            preset_id=preset_id,
            name=name,
        )

    @property
    def active(self) -> tuple[str, ...]:
        """Pool models with non-zero alpha and beta: the only ones the merge reads."""
        return tuple(m for m, a, b in zip(self.pool, self.alpha, self.beta, strict=True) if a != 0 and b != 0)

    def queried_models(self) -> tuple[str, ...]:
        """The models one output-mode completion asks: the reference and the active pool models
        (every pool model when the reference is the pool mean)."""
        if self.reference == MEAN_REFERENCE:
            return self.pool
        return (self.reference, *self.active)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON document (the file `MergedModel.save` writes)."""
        return {
            "format": MERGED_FORMAT,
            "version": 1,
            "name": self.name,
            "mode": self.mode,
            "pool": list(self.pool),
            "alpha": list(self.alpha),
            "beta": list(self.beta),
            "source": dict(self.source),
            "reference": self.reference,
            "answer_set": list(self.answer_set),
            "scoring": self.scoring.to_dict(),
            "preset_id": self.preset_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergedSpec:
        """The inverse of `to_dict`; ConfigError naming what is wrong."""
        if data.get("format") != MERGED_FORMAT:
            raise ConfigError("not an evomerge merged-model document")
        if data.get("version") != 1:
            raise ConfigError(f"unsupported merged-model version {data.get('version')!r}")
        try:
            return cls(
                mode=data["mode"],
                pool=data["pool"],
                alpha=data["alpha"],
                beta=data["beta"],
                source=data.get("source") or {},
                reference=data.get("reference", MEAN_REFERENCE),
                answer_set=data.get("answer_set") or (),
                scoring=ScoringConfig.from_dict(data.get("scoring") or {}),
                preset_id=data.get("preset_id"),
                name=data.get("name", "evomerge-merged"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the merged-model document is incomplete or malformed: {exc}") from exc


def load_spec(path: str | Path) -> MergedSpec:
    """The merged model in a saved `MergedSpec` file or in a `result.json` of `evomerge demo`."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"load_spec needs a file path, got {path!r:.60}")
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} is not a JSON object")
    fmt = data.get("format")
    if fmt == MERGED_FORMAT:
        return MergedSpec.from_dict(data)
    if fmt == _OUTPUT_DEMO_FORMAT and isinstance(data.get("merged_model"), dict):
        return MergedSpec.from_dict(data["merged_model"])
    if fmt == _DEMO_FORMAT:
        # A provider-side demo result: the Evo-Merging vectors over the embedded service's pool preset.
        try:
            config = data["config"]
            candidate = data["evo_merging"]["candidate"]
            return MergedSpec(
                mode="provider",
                pool=data["pool"],
                alpha=candidate["alpha"],
                beta=candidate["beta"],
                source={
                    "kind": "embedded",
                    "repository_seed": int(config["repository_seed"]),
                    "pool_seed": int(data["seed"]),
                    "pool_size": int(config["pool_size"]),
                },
                preset_id=data["preset_id"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{p} is a demo result without a usable Evo-Merging merge: {exc}") from exc
    raise ConfigError(f"{p} is neither a merged-model file nor an evomerge demo result")


def save_spec(spec: MergedSpec, path: str | Path) -> Path:
    """Write `spec` as strict JSON to `path` (atomically: a reader sees the old file or the new one)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give a file name")
    try:
        write_json_atomic(p, spec.to_dict())
    except OSError as exc:
        raise ConfigError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
