"""The embedded merge service's logic, apart from HTTP: presets, sessions, request checks, the work itself.

`LocalService` (`evomerge_sdk.local.server`) turns HTTP requests into calls of this module and its answers
into JSON. Everything here is plain Python and numpy, so it is tested without a socket, and every piece of
work is a pure function of the request (and the repository): the same request always gets the same answer,
whatever ran before or beside it.

Request checks raise `http.Refusal(status, message)` before anything changes, so a rejected request leaves
no trace (no session, no counted usage).

Token accounting (what `usage` reports): scoring one example reads its prompt tokens and the gold answer
token, all as input (a teacher-forced cross-entropy generates nothing); a completion reads the prompt and
generates one token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from ..http import Refusal
from .merge import PoolMerger
from .model import ModelWeights
from .repository import Repository, Target
from .tasks import Examples

__all__ = [
    "BASE_MODEL",
    "DATASET_SPLITS",
    "EXTENSIONS",
    "MAX_ABS_BETA",
    "MAX_TOP_LOGPROBS",
    "Catalog",
    "Decoding",
    "Preset",
    "Session",
    "integer_field",
    "parse_examples_indices",
    "parse_session_request",
    "parse_vectors",
    "prompt_of_messages",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

BASE_MODEL = "base"
"""The name of the base model on the chat route, and the `model_name_or_path` every preset is built on."""
DATASET_SPLITS = {"validation": "validation", "held_out": "holdout", "test": "test"}
"""Dataset split names of `query_plus.dataset` ("<target>:<split>") -> `Target` attribute."""
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


def _unprocessable(message: str) -> Refusal:
    return Refusal(422, message)


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
        raise _unprocessable(f"{where}{key} must be a finite number {bound}, got {value!r}")
    return float(value)


def integer_field(
    obj: Mapping[str, Any],
    key: str,
    default: int | None,
    *,
    low: int,
    high: int | None = None,
    where: str = "",
) -> int | None:
    """`obj[key]` as an integer in [low, high], `default` when absent; 422 naming the field otherwise."""
    value = obj.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise _unprocessable(f"{where}{key} must be an integer {bound}, got {value!r}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, *, max_len: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise _unprocessable(f"{key} must be a string of at most {max_len} characters")
    return value


def parse_vectors(body: Mapping[str, Any], n: int) -> tuple[FloatArray, FloatArray]:
    """`alpha` and `beta` of a request: lists of n finite numbers, alpha in [0, 1], |beta| <= MAX_ABS_BETA."""
    out = []
    for key in ("alpha", "beta"):
        value = body.get(key)
        if not isinstance(value, list):
            raise _unprocessable(f"{key} must be a list of {n} numbers, got {type(value).__name__}")
        if len(value) != n:
            raise _unprocessable(
                f"{key} must have {n} entries (one per adapter of the preset), got {len(value)}"
            )
        for i, x in enumerate(value):
            if not _is_number(x):
                raise _unprocessable(f"{key}[{i}] must be a number, got {x!r}")
            if not math.isfinite(x):
                raise _unprocessable(f"{key}[{i}] must be finite, got {x!r}")
        out.append(np.array(value, dtype=np.float64))
    alpha, beta = out
    if np.any(alpha < 0.0) or np.any(alpha > 1.0):
        i = int(np.flatnonzero((alpha < 0.0) | (alpha > 1.0))[0])
        raise _unprocessable(f"alpha entries are kept fractions in [0, 1]; alpha[{i}] = {float(alpha[i])!r}")
    if np.any(np.abs(beta) > MAX_ABS_BETA):
        i = int(np.flatnonzero(np.abs(beta) > MAX_ABS_BETA)[0])
        raise _unprocessable(
            f"beta entries must lie in [-{MAX_ABS_BETA:g}, {MAX_ABS_BETA:g}]; beta[{i}] = {float(beta[i])!r}"
        )
    return alpha, beta


def parse_examples_indices(value: object, n: int) -> IntArray | None:
    """The minibatch extension: sorted distinct indices into the session's n examples (None: all)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _unprocessable("examples must be a non-empty list of example indices (omit it to score all)")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise _unprocessable("examples must hold integer indices")
    idx = np.array(value, dtype=np.int64)
    if idx[0] < 0 or idx[-1] >= n:
        raise _unprocessable(f"example indices must lie in [0, {n}), got {int(idx.min())}..{int(idx.max())}")
    if np.any(np.diff(idx) <= 0):
        raise _unprocessable("example indices must be sorted and distinct")
    return idx


def prompt_of_messages(messages: object) -> str:
    """The text the embedded model reads from a chat: the last user message (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise Refusal(400, "messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Refusal(400, "every message must be an object with a string role")
    user = [m for m in messages if m["role"] == "user"]
    if not user:
        raise Refusal(400, "messages must include a user message")
    content = user[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return " ".join(str(p) for p in parts)
    raise Refusal(400, "a user message's content must be a string or a list of text parts")


# -- presets -----------------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class Preset:
    """A pool on offer: its adapters and the targets whose datasets its sessions may name."""

    preset_id: str
    adapters: tuple[str, ...]
    targets: tuple[Target, ...]
    pool_seed: int | None = None

    @property
    def datasets(self) -> list[str]:
        """The dataset names sessions of this preset may use."""
        return [f"{t.name}:{split}" for t in self.targets for split in DATASET_SPLITS]


@attrs.frozen
class Decoding:
    """Decoding settings of a session (`query_plus`), the defaults of its completions."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1


@attrs.frozen(eq=False)
class Session:
    """What a session scores: a preset, a dataset (named or inline), decoding settings."""

    session_id: str
    preset: Preset
    model_name_or_path: str
    dataset: str
    examples: Examples
    tokens: IntArray  # per example: prompt tokens + the answer token
    decoding: Decoding
    query_plus: dict[str, Any]  # normalised echo (inline examples as a count)

    @property
    def n_examples(self) -> int:
        """Examples a full evaluation scores."""
        return len(self.examples)

    def describe(self, *, extensions: bool) -> dict[str, Any]:
        """The session's JSON answer (the reference fields, plus this service's extensions)."""
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "preset_id": self.preset.preset_id,
            "adapter_count": len(self.preset.adapters),
            "query_plus": self.query_plus,
        }
        if extensions:
            out |= {
                "model_name_or_path": self.model_name_or_path,
                "dataset": self.dataset,
                "n_examples": self.n_examples,
                "max_tokens_per_evaluation": int(self.tokens.sum()),
                "max_tokens_per_example": int(self.tokens.max()),
                "adapters": list(self.preset.adapters),
            }
        return out


class Catalog:
    """The presets a repository offers and the mergers and models behind them (built on first use).

    Presets: `"<target>/pool-<size>"` (the repository's stratified pool of that size for the target,
    drawn with `pool_seed`) for every target and every size the repository can fill, and `"hub"`
    (every adapter, every target's data).
    """

    def __init__(
        self, repository: Repository, pool_sizes: Sequence[int] = (5, 20, 100), pool_seed: int = 0
    ) -> None:
        self.repository = repository
        self.revision = repository.config.key()[:16]
        presets: dict[str, Preset] = {}
        limit = len(repository.adapter_names) - 1  # an out-of-domain target's specialist stays out
        sizes = sorted(set(pool_sizes))
        if all(size > limit for size in sizes):
            raise ConfigError(
                f"pool sizes {sizes} do not fit a repository of {limit + 1} adapters (at most {limit})"
            )
        for target in repository.targets():
            for size in sizes:
                if size > limit:
                    continue  # a pool this size does not exist here (the hub preset holds everything)
                names = repository.pool(target, size, pool_seed)
                pid = preset_id(target.name, size)
                presets[pid] = Preset(pid, tuple(names), (target,), pool_seed)
        presets["hub"] = Preset("hub", repository.adapter_names, repository.targets())
        self.presets = presets
        self._mergers: dict[str, PoolMerger] = {}
        self._models: OrderedDict[str, ModelWeights] = OrderedDict()
        self._merged: OrderedDict[str, ModelWeights] = OrderedDict()
        self._lock = threading.Lock()
        tokenizer = repository.tokenizer
        self.answer_ids = repository.world.label_ids
        self.answer_set = tuple(tokenizer.tokens[int(i)] for i in self.answer_ids)

    def preset(self, pid: object) -> Preset:
        """A preset by id; 404 for an unknown one."""
        if not isinstance(pid, str) or pid not in self.presets:
            raise Refusal(404, f"unknown preset_id {pid!r}; GET /v1/presets lists them", "not_found_error")
        return self.presets[pid]

    def describe(self, preset: Preset, *, extensions: bool) -> dict[str, Any]:
        """A preset's entry in `GET /v1/presets`."""
        out: dict[str, Any] = {
            "preset_id": preset.preset_id,
            "adapter_count": len(preset.adapters),
            "adapters": list(preset.adapters),
            "model_name_or_path": BASE_MODEL,
            "datasets": preset.datasets,
        }
        if extensions:
            out |= {
                "targets": [{"name": t.name, "kind": t.kind} for t in preset.targets],
                "answer_set": list(self.answer_set),
                "revision": self.revision,
                "pool_seed": preset.pool_seed,
            }
        return out

    def merger(self, preset: Preset) -> PoolMerger:
        """The preset's merger (magnitude orders computed once)."""
        with self._lock:
            merger = self._mergers.get(preset.preset_id)
        if merger is None:
            merger = self.repository.merger(preset.adapters)
            with self._lock:
                merger = self._mergers.setdefault(preset.preset_id, merger)
        return merger

    # -- datasets --------------------------------------------------------------------------------
    def dataset(self, preset: Preset, name: object) -> Examples:
        """The examples of a named dataset "<target>:<split>" the preset offers."""
        if not isinstance(name, str) or ":" not in name:
            raise _unprocessable(f"query_plus.dataset must look like '<target>:validation', got {name!r}")
        target_name, _, split = name.rpartition(":")
        if split not in DATASET_SPLITS:
            raise _unprocessable(f"dataset split must be one of {sorted(DATASET_SPLITS)}, got {split!r}")
        for target in preset.targets:
            if target.name == target_name:
                examples: Examples = getattr(target, DATASET_SPLITS[split])
                return examples
        raise _unprocessable(
            f"preset {preset.preset_id!r} has no dataset {name!r}; it offers {preset.datasets}"
        )

    def inline_examples(self, value: object, limit: int) -> Examples:
        """Inline validation data: [{"prompt": str, "label": str}] with labels from the answer set."""
        if not isinstance(value, list) or not value:
            raise _unprocessable("query_plus.examples must be a non-empty list of {prompt, label} objects")
        if len(value) > limit:
            raise _unprocessable(
                f"query_plus.examples holds {len(value)} examples; this service takes {limit}"
            )
        tokenizer = self.repository.tokenizer
        answers = set(self.answer_set)
        prompts, labels = [], []
        for i, ex in enumerate(value):
            if not isinstance(ex, dict) or set(ex) != {"prompt", "label"}:
                raise _unprocessable(
                    f"query_plus.examples[{i}] must be an object with exactly prompt and label"
                )
            prompt, label = ex["prompt"], ex["label"]
            if not isinstance(prompt, str) or not isinstance(label, str):
                raise _unprocessable(f"query_plus.examples[{i}]: prompt and label must be strings")
            if not tokenizer.split(prompt):
                raise _unprocessable(f"query_plus.examples[{i}].prompt has no words")
            if label not in answers:
                raise _unprocessable(
                    f"query_plus.examples[{i}].label {label!r} is not in the answer set "
                    f"{list(self.answer_set)}"
                )
            prompts.append(prompt)
            labels.append(label)
        return self.repository.examples(prompts, labels)

    # -- models for completions ------------------------------------------------------------------
    def chat_models(self) -> list[str]:
        """Every model name the chat route serves: the base, each adapter, each materialized merge."""
        with self._lock:
            merged = list(self._merged)
        return [BASE_MODEL, *self.repository.adapter_names, *merged]

    def model(self, name: object) -> ModelWeights:
        """The weights behind a chat model name; 404 (OpenAI's `model_not_found`) for an unknown one."""
        if not isinstance(name, str) or not name:
            raise Refusal(400, "model must be a non-empty string")
        if name == BASE_MODEL:
            return self.repository.base
        with self._lock:
            weights = self._models.get(name) or self._merged.get(name)
        if weights is not None:
            return weights
        if name not in self.repository.adapter_names:
            raise Refusal(
                404, f"The model {name!r} does not exist: use 'base' or an adapter name", "model_not_found"
            )
        weights = self.repository.single(name)
        with self._lock:
            self._models[name] = weights
        return weights

    def register_merged(self, name: str, weights: ModelWeights, keep: int = 64) -> None:
        """Serve a materialized merge on the chat route (the `keep` most recent ones)."""
        with self._lock:
            self._merged[name] = weights
            self._merged.move_to_end(name)
            while len(self._merged) > keep:
                self._merged.popitem(last=False)

    # -- the work (each a pure function of its arguments; run in a worker thread) ------------------
    def evaluate(
        self, session: Session, alpha: FloatArray, beta: FloatArray, indices: IntArray | None
    ) -> dict[str, Any]:
        """Loss, accuracy, macro-F1 and usage of the merge (alpha, beta) on the session's data."""
        examples = session.examples if indices is None else session.examples.subset(indices)
        tokens = int(session.tokens.sum() if indices is None else session.tokens[indices].sum())
        with np.errstate(all="ignore"):
            weights = self.merger(session.preset).merge(alpha, beta)
            metrics = self.repository.evaluate(weights, examples)
        return {
            "loss": metrics.loss if math.isfinite(metrics.loss) else None,
            "accuracy": metrics.accuracy,
            "macro_f1": metrics.macro_f1,
            "n_examples": metrics.n,
            "usage": usage(tokens, 0),
        }

    def next_token(
        self, weights: ModelWeights, prompt: str, decoding: Decoding, top_logprobs: int, seed: int
    ) -> dict[str, Any]:
        """One generated token of the embedded model for a text prompt, with its log-probabilities."""
        tokenizer = self.repository.tokenizer
        words = tokenizer.split(prompt)
        if not words:
            raise _unprocessable("the prompt has no words")
        with np.errstate(all="ignore"):
            row = self.repository.next_token_logprobs(weights, [prompt])[0]
        choice = choose_token(row, decoding, seed)
        order = np.argsort(-row, kind="stable")[:top_logprobs]
        token = tokenizer.tokens[choice]
        return {
            "text": token,
            "token": token,
            "logprob": float(row[choice]),
            "top_logprobs": [(tokenizer.tokens[int(i)], float(row[i])) for i in order],
            "prompt_tokens": len(words),
        }

    def materialize(
        self, session: Session, alpha: FloatArray, beta: FloatArray, directory: Path
    ) -> dict[str, Any]:
        """Write the merged LoRA pairs (A_m, B_m per adapted matrix) as .npz; serve the merge on chat."""
        digest = hashlib.sha256(
            json.dumps(
                [self.revision, session.preset.preset_id, alpha.tolist(), beta.tolist()],
                separators=(",", ":"),
            ).encode()
        ).hexdigest()[:16]
        name = f"merged-{digest}"
        merger = self.merger(session.preset)
        with np.errstate(all="ignore"):
            pairs = merger.merged_pairs(alpha, beta)
            weights = merger.merge(alpha, beta)
        arrays: dict[str, Any] = {}
        for k, (a_m, b_m) in enumerate(pairs):
            arrays[f"a{k}"] = a_m
            arrays[f"b{k}"] = b_m
        meta = {
            "format": "evomerge-sdk/merged-lora",
            "version": 1,
            "adapter_name": name,
            "preset_id": session.preset.preset_id,
            "adapters": list(session.preset.adapters),
            "alpha": alpha.tolist(),
            "beta": beta.tolist(),
            "scale": merger.scale,
            "matrices": ["w1", "w2", "w3"],
            "revision": self.revision,
        }
        path = directory / f"{name}.npz"
        _write_npz(path, meta, arrays)
        self.register_merged(name, weights)
        return {"path": str(path), "adapter_name": name, "format": "npz", "bytes": path.stat().st_size}


def preset_id(target: str, size: int) -> str:
    """The id of a target's pool preset of a size."""
    return f"{target}/pool-{size}"


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """A `usage` object."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def choose_token(row: FloatArray, decoding: Decoding, seed: int) -> int:
    """Greedy at temperature 0; otherwise a draw from the top-k / top-p filtered distribution (seeded)."""
    if decoding.temperature == 0.0:
        return int(np.argmax(row))
    order = np.argsort(-row, kind="stable")
    if decoding.top_k:
        order = order[: decoding.top_k]
    z = row[order] / decoding.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if decoding.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), decoding.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    rng = np.random.default_rng(seed)
    return int(order[rng.choice(order.size, p=p)])


def request_seed(body: Mapping[str, Any]) -> int:
    """The request's own `seed`, else a hash of its canonical JSON: sampling is a function of the request."""
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed % 2**63
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
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
    catalog: Catalog,
    body: Mapping[str, Any],
    session_id: str,
    *,
    max_inline_examples: int,
    extensions: bool,
) -> Session:
    """A new session from `POST /v1/sessions`; Refusal for anything malformed (nothing is created)."""
    preset = catalog.preset(body.get("preset_id"))
    model = body.get("model_name_or_path")
    if model is not None and model != BASE_MODEL:
        raise _unprocessable(
            f"model_name_or_path {model!r} is not served; this service's base is {BASE_MODEL!r}"
        )
    raw = body.get("query_plus")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _unprocessable("query_plus must be an object")
    allowed = _QUERY_PLUS_KEYS if extensions else tuple(k for k in _QUERY_PLUS_KEYS if k != "examples")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise _unprocessable(f"query_plus has unknown fields {unknown}; known: {list(allowed)}")
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
            raise _unprocessable("query_plus takes a dataset name or inline examples, not both")
        examples = catalog.inline_examples(raw["examples"], max_inline_examples)
        dataset = "inline"
        query_plus["inline_examples"] = len(examples)
    else:
        name = raw.get("dataset")
        if name is None:
            if len(preset.targets) != 1:
                raise _unprocessable(
                    f"preset {preset.preset_id!r} serves several targets: name query_plus.dataset"
                )
            name = f"{preset.targets[0].name}:validation"
        examples = catalog.dataset(preset, name)
        dataset = str(name)
        query_plus["dataset"] = dataset
    if batches is not None:
        assert batch_size is not None
        examples = examples.subset(slice(0, min(len(examples), batch_size * batches)))
    tokens = (examples.lengths + 1).astype(np.int64)
    return Session(session_id, preset, BASE_MODEL, dataset, examples, tokens, decoding, query_plus)


def tag_of(body: Mapping[str, Any]) -> str | None:
    """The optional `tag` of an evaluate/materialize request (a label echoed back)."""
    return _optional_str(body, "tag")


def _write_npz(path: Path, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Atomically (temp file, fsync, rename), readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".merged-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
