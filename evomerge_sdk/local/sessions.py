"""The merge service's request checks and sessions, apart from HTTP and from any backend.

`LocalService` (`evomerge_sdk.local.server`) turns HTTP requests into calls of this module and of its
`MergeBackend` (`local.backend`), and their answers into JSON. Everything here is plain Python, so it is
tested without a socket, and it is the same for every backend: vectors, example indices, decoding
settings, `query_plus`, chat messages.

Request checks raise the domain errors of `local.backend` (`InvalidField`, `MalformedRequest`,
`NotFound`) before anything changes, so a rejected request leaves no trace (no session, no counted usage);
the server maps them to statuses.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from .._checks import is_int
from .._io import canonical_json
from .._types import FloatArray, IntArray
from .backend import Decoding, ExampleSet, InvalidField, MalformedRequest, MergeBackend, NotFound, Preset

__all__ = [
    "EXTENSIONS",
    "MAX_ABS_BETA",
    "MAX_TOP_LOGPROBS",
    "Session",
    "describe_preset",
    "integer_field",
    "parse_decoding",
    "parse_examples_indices",
    "parse_session_request",
    "parse_top_logprobs",
    "parse_vectors",
    "prompt_of_messages",
    "request_seed",
    "tag_of",
    "usage",
]


EXTENSIONS = (
    "usage",
    "metrics",
    "inline_examples",
    "minibatch",
    "complete",
    "chat_completions",
    "delete_session",
)
"""What the embedded service offers beyond the reference routes (`GET /health` lists them)."""
MAX_ABS_BETA = 1000.0
"""Larger scales overflow the float32 forward pass; the search box is [-1.5, 1.5]."""
MAX_TOP_LOGPROBS = 20
_QUERY_PLUS_KEYS = (
    "dataset",
    "examples",
    "batch_size",
    "evaluation_batches",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
)


# -- JSON field checks ------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(
    obj: Mapping[str, Any], key: str, default: float, *, low: float, high: float = math.inf, where: str
) -> float:
    value = obj.get(key)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
        bound = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise InvalidField(f"{where}{key} must be a finite number {bound}, got {value!r}")
    return float(value)


_INT64_MAX = 2**63 - 1


def integer_field(
    obj: Mapping[str, Any],
    key: str,
    default: int | None,
    *,
    low: int,
    high: int | None = None,
    where: str = "",
) -> int | None:
    """`obj[key]` as an integer in [low, high], `default` when absent; 422 naming the field otherwise.

    Without `high`, the bound is the int64 range every client and numpy agree on (2^70 is refused here,
    not overflowed into a 500 later)."""
    value = obj.get(key)
    if value is None:
        return default
    if high is None:
        high = _INT64_MAX
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidField(f"{where}{key} must be an integer {bound}, got {value!r}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, *, max_len: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidField(f"{key} must be a string of at most {max_len} characters")
    return value


def parse_vectors(body: Mapping[str, Any], n: int) -> tuple[FloatArray, FloatArray]:
    """`alpha` and `beta` of a request: lists of n finite numbers, alpha in [0, 1], |beta| <= MAX_ABS_BETA."""
    out = []
    for key in ("alpha", "beta"):
        value = body.get(key)
        if not isinstance(value, list):
            raise InvalidField(f"{key} must be a list of {n} numbers, got {type(value).__name__}")
        if len(value) != n:
            raise InvalidField(
                f"{key} must have {n} entries (one per adapter of the preset), got {len(value)}"
            )
        for i, x in enumerate(value):
            if not _is_number(x):
                raise InvalidField(f"{key}[{i}] must be a number, got {x!r}")
            if not math.isfinite(x):
                raise InvalidField(f"{key}[{i}] must be finite, got {x!r}")
        out.append(np.array(value, dtype=np.float64))
    alpha, beta = out
    if np.any(alpha < 0.0) or np.any(alpha > 1.0):
        i = int(np.flatnonzero((alpha < 0.0) | (alpha > 1.0))[0])
        raise InvalidField(f"alpha entries are kept fractions in [0, 1]; alpha[{i}] = {float(alpha[i])!r}")
    if np.any(np.abs(beta) > MAX_ABS_BETA):
        i = int(np.flatnonzero(np.abs(beta) > MAX_ABS_BETA)[0])
        raise InvalidField(
            f"beta entries must lie in [-{MAX_ABS_BETA:g}, {MAX_ABS_BETA:g}]; beta[{i}] = {float(beta[i])!r}"
        )
    return alpha, beta


def parse_examples_indices(value: object, n: int) -> IntArray | None:
    """The minibatch extension: sorted distinct indices into the session's n examples (None: all)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise InvalidField("examples must be a non-empty list of example indices (omit it to score all)")
    if any(not is_int(i) for i in value):
        raise InvalidField("examples must hold integer indices")
    outside = next((i for i in value if not 0 <= i < n), None)  # checked as Python ints: 2^70 fits no array
    if outside is not None:
        raise InvalidField(f"examples: indices must lie in [0, {n}), got {outside:.6g}")
    idx = np.array(value, dtype=np.int64)
    if np.any(np.diff(idx) <= 0):
        raise InvalidField("example indices must be sorted and distinct")
    return idx


def prompt_of_messages(messages: object) -> str:
    """The text a backend reads from a chat: the service's chat template, which is every turn's text in
    order (system, user and assistant alike, text parts joined), so the whole history conditions the
    answer. A chat needs a user message."""
    if not isinstance(messages, list) or not messages:
        raise MalformedRequest("messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise MalformedRequest("every message must be an object with a string role")
    if not any(m["role"] == "user" for m in messages):
        raise MalformedRequest("messages must include a user message")
    texts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            parts = [p.get("text") for p in content if p.get("type") == "text"]
            if parts and all(isinstance(p, str) for p in parts):
                content = " ".join(str(p) for p in parts)
        if content is None and m["role"] == "assistant":
            continue
        if not isinstance(content, str):
            raise MalformedRequest("a message's content must be a string or a list of text parts")
        texts.append(content)
    return " ".join(t for t in texts if t)


# -- sessions ---------------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class Session:
    """What a session scores: a preset, a dataset (named or inline), decoding settings."""

    session_id: str
    preset: Preset
    model_name_or_path: str
    dataset: str
    examples: ExampleSet
    decoding: Decoding
    query_plus: dict[str, Any]  # normalised echo (inline examples as a count)

    @property
    def n_examples(self) -> int:
        """Examples a full evaluation scores."""
        return len(self.examples)

    @property
    def tokens(self) -> IntArray:
        """Per example, the tokens one evaluation of it processes."""
        return self.examples.tokens

    def describe(self, *, extensions: bool) -> dict[str, Any]:
        """The session's JSON answer (the reference fields, plus this service's extensions)."""
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "preset_id": self.preset.preset_id,
            "adapter_count": len(self.preset.adapters),
            "query_plus": self.query_plus,
        }
        if extensions:
            tokens = self.tokens
            out |= {
                "model_name_or_path": self.model_name_or_path,
                "dataset": self.dataset,
                "n_examples": self.n_examples,
                "max_tokens_per_evaluation": int(tokens.sum()),
                "max_tokens_per_example": int(tokens.max()),
                "adapters": list(self.preset.adapters),
            }
        return out


def describe_preset(backend: MergeBackend, preset: Preset, *, extensions: bool) -> dict[str, Any]:
    """A preset's entry in `GET /v1/presets` (the backend's extension fields when extensions are on)."""
    out: dict[str, Any] = {
        "preset_id": preset.preset_id,
        "adapter_count": len(preset.adapters),
        "adapters": list(preset.adapters),
        "model_name_or_path": backend.base_model,
        "datasets": list(preset.datasets),
    }
    if extensions:
        out |= dict(preset.extra)
    return out


def find_preset(backend: MergeBackend, pid: object) -> Preset:
    """A preset by id; `NotFound` for an unknown one."""
    if not isinstance(pid, str) or pid not in backend.presets:
        raise NotFound(f"unknown preset_id {pid!r}; GET /v1/presets lists them")
    return backend.presets[pid]


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """A `usage` object."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def request_seed(body: Mapping[str, Any]) -> int:
    """The request's own `seed`, else a hash of its canonical JSON: sampling is a function of the request."""
    seed = integer_field(body, "seed", None, low=-_INT64_MAX - 1)  # OpenAI's seed is an int64
    if seed is not None:
        return seed % 2**63
    blob = canonical_json(body).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def parse_decoding(body: Mapping[str, Any], defaults: Decoding, *, where: str = "") -> Decoding:
    """Decoding settings of a request, over `defaults`."""
    return Decoding(
        temperature=_number(body, "temperature", defaults.temperature, low=0.0, high=2.0, where=where),
        top_p=_number(body, "top_p", defaults.top_p, low=1e-9, high=1.0, where=where),
        top_k=integer_field(body, "top_k", defaults.top_k, low=0, where=where) or 0,
        max_new_tokens=integer_field(body, "max_new_tokens", defaults.max_new_tokens, low=1, where=where)
        or 1,
    )


def parse_top_logprobs(body: Mapping[str, Any]) -> int:
    """`top_logprobs` of a request: 0..MAX_TOP_LOGPROBS."""
    return integer_field(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS, where="") or 0


def parse_session_request(
    backend: MergeBackend,
    body: Mapping[str, Any],
    session_id: str,
    *,
    max_inline_examples: int,
    extensions: bool,
) -> Session:
    """A new session from `POST /v1/sessions`; a domain error for anything malformed (nothing is created)."""
    preset = find_preset(backend, body.get("preset_id"))
    base = backend.base_model
    model = body.get("model_name_or_path")
    if model is not None and model != base:
        raise InvalidField(f"model_name_or_path {model!r} is not served; this service's base is {base!r}")
    raw = body.get("query_plus")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidField("query_plus must be an object")
    allowed = _QUERY_PLUS_KEYS if extensions else tuple(k for k in _QUERY_PLUS_KEYS if k != "examples")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise InvalidField(f"query_plus has unknown fields {unknown}; known: {list(allowed)}")
    where = "query_plus."
    decoding = parse_decoding(raw, Decoding(), where=where)
    batch_size = integer_field(raw, "batch_size", 32, low=1, where=where)
    batches = integer_field(raw, "evaluation_batches", None, low=1, where=where)
    query_plus: dict[str, Any] = {
        "batch_size": batch_size,
        "evaluation_batches": batches,
        **attrs.asdict(decoding),
    }
    if raw.get("examples") is not None:
        if raw.get("dataset") is not None:
            raise InvalidField("query_plus takes a dataset name or inline examples, not both")
        examples = _inline_examples(backend, raw["examples"], max_inline_examples)
        dataset = "inline"
        query_plus["inline_examples"] = len(examples)
    else:
        name = raw.get("dataset")
        if name is None:
            if preset.default_dataset is None:
                raise InvalidField(
                    f"preset {preset.preset_id!r} serves several targets: name query_plus.dataset"
                )
            name = preset.default_dataset
        examples = backend.dataset(preset, name)
        dataset = str(name)
        query_plus["dataset"] = dataset
    if batches is not None:
        assert batch_size is not None
        examples = examples.subset(slice(0, min(len(examples), batch_size * batches)))
    return Session(session_id, preset, base, dataset, examples, decoding, query_plus)


def _inline_examples(backend: MergeBackend, value: object, limit: int) -> ExampleSet:
    """`query_plus.examples`: a non-empty list of at most `limit` items, each checked by the backend."""
    if not isinstance(value, list) or not value:
        raise InvalidField("query_plus.examples must be a non-empty list of {prompt, label} objects")
    if len(value) > limit:
        raise InvalidField(f"query_plus.examples holds {len(value)} examples; this service takes {limit}")
    return backend.inline_examples(value)


def tag_of(body: Mapping[str, Any]) -> str | None:
    """The optional `tag` of an evaluate/materialize request (a label echoed back)."""
    return _optional_str(body, "tag")
