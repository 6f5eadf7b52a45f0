"""The seam between the merge service and the models it merges: `MergeBackend`.

`LocalService` (`local.server`) owns everything that is protocol: the routes, bearer-token auth, body
caps, the session cap and expiry, request validation (`local.sessions`), rate limits and fault injection,
and the mapping of the domain errors below onto HTTP statuses. A backend owns the models: which pools it
offers, what its datasets hold, and how a merge (alpha, beta) is scored, written out and completed with.
The embedded numpy repository (`local.repository_backend.RepositoryBackend`) is the first backend; a
torch + PEFT one (the `evomerge-peft` distribution) reuses the service unchanged by implementing this:

    revision: str                      names the weights served (answers and cache keys carry it)
    base_model: str                    the base model's name (`model_name_or_path`, the chat route)
    presets: Mapping[str, Preset]      the pools on offer, by id
    dataset(preset, name)              -> ExampleSet    a dataset the preset offers, by name
    inline_examples(items)             -> ExampleSet    `query_plus.examples` (a non-empty list, capped)
    evaluate(preset, alpha, beta, examples) -> Evaluation   the loss (+ metrics), tokens processed
    materialize(preset, alpha, beta, directory) -> dict     write the merge; serve it on chat afterwards
    chat_models()                      -> list[str]     every model name the chat route serves
    chat(model, prompt, decoding, top_logprobs, seed)   -> Generation
    complete(preset, alpha, beta, prompt, decoding, top_logprobs, seed) -> Generation
    prompt_tokens(text)                -> int           a prompt's tokens (TPM costing before the work)

The service calls the methods from worker threads (at most `workers` at once), after validating the
request's shape (vector lengths and ranges, field types, example indices); a method raises a domain
error below for what only the backend can judge (an unknown dataset, a label outside the answer set).
Each method must be a pure function of its arguments and the weights, so an answer never depends on
what ran before or beside it: the SDK's caches and its determinism guarantee rest on that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from .._types import FloatArray, IntArray

__all__ = [
    "Decoding",
    "Evaluation",
    "ExampleSet",
    "GeneratedToken",
    "Generation",
    "InvalidField",
    "MalformedRequest",
    "MergeBackend",
    "NotFound",
    "Preset",
    "ServiceRequestError",
]


# -- domain errors (the service maps them to statuses; nothing here knows HTTP) ----------------------
class ServiceRequestError(Exception):
    """A request the service refuses, in domain terms; `kind` is the error type its answer carries."""

    kind = "invalid_request_error"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class NotFound(ServiceRequestError):
    """The request names something that does not exist: a preset, session, model or dataset (404)."""

    kind = "not_found_error"


class InvalidField(ServiceRequestError):
    """A field of a well-formed request holds a value the service cannot use (422)."""


class MalformedRequest(ServiceRequestError):
    """The request cannot be read as what its route takes, e.g. a chat without messages (400)."""


# -- values ------------------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class Preset:
    """A pool on offer: its adapters (their order is the order of alpha and beta), the datasets its
    sessions may name, the one a session gets when it names none, and the extension fields
    `GET /v1/presets` adds for it (JSON values)."""

    preset_id: str
    adapters: tuple[str, ...]
    datasets: tuple[str, ...]
    default_dataset: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Decoding:
    """Decoding settings of a session (`query_plus`), the defaults of its completions."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1


class ExampleSet(Protocol):
    """What a session scores: the backend's own examples, opaque to the service but for their count and,
    per example, the tokens one evaluation of it processes (what `usage` and TPM limits count)."""

    @property
    def tokens(self) -> IntArray:
        """Tokens one evaluation processes, per example."""
        ...

    def __len__(self) -> int: ...

    def subset(self, index: IntArray | slice) -> ExampleSet:
        """The examples at `index` (sorted, distinct), in order."""
        ...


@attrs.frozen
class Evaluation:
    """The score of one merge on some examples: the loss the search minimises (non-finite when the
    merge broke the model: the service answers null), further metrics by name, and the tokens processed."""

    loss: float
    metrics: Mapping[str, float]
    n_examples: int
    input_tokens: int


@attrs.frozen
class GeneratedToken:
    """One generated token, its log-probability and the most likely alternatives (token, logprob)."""

    token: str
    logprob: float
    top_logprobs: tuple[tuple[str, float], ...] = ()


@attrs.frozen
class Generation:
    """A completion: its text, its tokens, and the prompt's length in tokens."""

    text: str
    tokens: tuple[GeneratedToken, ...]
    prompt_tokens: int


@runtime_checkable
class MergeBackend(Protocol):
    """The model side of the merge service (see the module docstring for the contract)."""

    @property
    def revision(self) -> str: ...

    @property
    def base_model(self) -> str: ...

    @property
    def presets(self) -> Mapping[str, Preset]: ...

    def dataset(self, preset: Preset, name: str) -> ExampleSet:
        """A dataset the preset offers; `InvalidField` naming the problem otherwise."""
        ...

    def inline_examples(self, items: Sequence[Any]) -> ExampleSet:
        """Inline validation data (a non-empty list, already capped); `InvalidField` naming a bad item."""
        ...

    def evaluate(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, examples: ExampleSet
    ) -> Evaluation:
        """Score the merge (alpha, beta) of the preset's pool on `examples`."""
        ...

    def materialize(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, directory: Path
    ) -> dict[str, Any]:
        """Write the merge under `directory` and serve it on the chat route; at least `path` and
        `adapter_name` (the chat model name it is served as)."""
        ...

    def chat_models(self) -> list[str]:
        """Every model the chat route serves: the base, each adapter, each materialized merge."""
        ...

    def chat(self, model: str, prompt: str, decoding: Decoding, top_logprobs: int, seed: int) -> Generation:
        """A completion of `prompt` by a model `chat_models` lists (`seed` drives any sampling)."""
        ...

    def complete(
        self,
        preset: Preset,
        alpha: FloatArray,
        beta: FloatArray,
        prompt: str,
        decoding: Decoding,
        top_logprobs: int,
        seed: int,
    ) -> Generation:
        """A completion of `prompt` by the merge (alpha, beta) of the preset's pool."""
        ...

    def prompt_tokens(self, text: str) -> int:
        """Tokens the model reads for `text` (costs a request before its work runs)."""
        ...
