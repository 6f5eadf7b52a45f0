"""The merged model as a thing to use: `await merged.complete(messages)`, like any chat model.

Two modes, one interface:

* output space (DESIGN 1.2): each prompt is scored by the reference (a named base model) and by every
  pool model whose alpha and beta are both non-zero, through the `Scheduler` (cached, budgeted,
  retried); their option scores are merged with the found vectors and the answer is the best option.
  Models with a zero weight are never queried. (With the pool mean as reference, the mean needs every
  model, so all are queried.)
* provider side (DESIGN 1.1): the merge service answers with the merged weights (`/complete` of the
  embedded service, through `MergeServiceClient`).

A `MergedSpec` is everything needed to rebuild the model (mode, pool, vectors, reference, answer set,
scoring settings, where the models live). `MergedModel.save` writes it as JSON; `load_spec` reads it
back from that file or from a `result.json` written by `evomerge demo` (either mode).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs
import numpy as np
from numpy.typing import ArrayLike

from .engine.operators import merge_outputs
from .engine.search import write_json_atomic
from .errors import ConfigError
from .objectives import (
    MEAN_REFERENCE,
    AnswerSet,
    Providers,
    ScoringConfig,
    log_softmax,
    provider_for,
    score_prompt,
)
from .providers import Completion, Message, TokenLogprob, Usage, as_messages
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .service import MergeServiceClient, ServiceSession

__all__ = ["MERGED_FORMAT", "MergedModel", "MergedSpec", "load_spec", "open_merged", "save_spec"]

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


@attrs.frozen
class MergedSpec:
    """What a merged model is: its mode, pool, vectors and how to reach its models.

    `source` says where the models live: `{"kind": "embedded", "repository_seed", "pool_seed",
    "pool_size"}` (plus `"small_repository": true` for the test-sized one) for the embedded service
    (which `evomerge serve` starts itself), or `{"kind": "openai", "base_url"}` / `{"kind": "service",
    "base_url"}` for a running server.
    Output mode needs `answer_set` and `reference`; provider mode needs `preset_id`.
    """

    mode: Literal["output", "provider"]
    pool: tuple[str, ...] = attrs.field(converter=_strings)
    alpha: tuple[float, ...] = attrs.field(converter=_floats)
    beta: tuple[float, ...] = attrs.field(converter=_floats)
    source: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
    reference: str = MEAN_REFERENCE
    answer_set: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    scoring: ScoringConfig = attrs.field(factory=ScoringConfig)
    preset_id: str | None = None
    name: str = "evomerge-merged"

    def __attrs_post_init__(self) -> None:
        if self.mode not in ("output", "provider"):
            raise ConfigError(f"mode must be 'output' or 'provider', got {self.mode!r}")
        if not isinstance(self.scoring, ScoringConfig):
            raise ConfigError(f"scoring must be a ScoringConfig, got {type(self.scoring).__name__}")
        for field in ("reference", "name", "preset_id"):
            value = getattr(self, field)
            if not (isinstance(value, str) and value) and not (field == "preset_id" and value is None):
                raise ConfigError(f"{field} must be a non-empty string, got {value!r:.60}")
        n = len(self.pool)
        if n == 0 or len(self.alpha) != n or len(self.beta) != n:
            raise ConfigError(
                f"a pool of {n} models needs as many alpha and beta entries "
                f"(got {len(self.alpha)} and {len(self.beta)})"
            )
        if any(not 0.0 <= a <= 1.0 for a in self.alpha):
            raise ConfigError("alpha entries must lie in [0, 1]")
        if self.mode == "output":
            AnswerSet(self.answer_set)  # validates
            if self.reference != MEAN_REFERENCE and self.reference in self.pool:
                raise ConfigError(f"the reference {self.reference!r} must not be a pool model")
        elif not self.preset_id:
            raise ConfigError("a provider-side merged model needs the preset_id of its pool")

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


def _messages(messages: str | Sequence[Message] | Sequence[Mapping[str, str]]) -> tuple[Message, ...]:
    out = as_messages(messages)
    if not out:
        raise ConfigError("a completion needs at least one message")
    return out


class MergedModel:
    """The merged model of a search, used like a chat model: `await merged.complete(messages)`.

    Output mode takes the `provider` that reaches the pool's models and the reference (or a mapping of
    model name to provider, for a pool spread over several APIs) and, optionally,
    a `scheduler` (otherwise it opens its own, with an in-memory cache). Provider mode takes a
    `MergeServiceClient` (its scheduler is used). Use it as `async with MergedModel(...) as merged:` so
    what it opened is closed; `models_queried` counts requests per model.
    """

    def __init__(
        self,
        spec: MergedSpec,
        *,
        provider: Providers | None = None,
        client: MergeServiceClient | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        if not isinstance(spec, MergedSpec):
            raise ConfigError(f"spec must be a MergedSpec, got {type(spec).__name__}")
        if not (provider is None or isinstance(provider, Mapping) or hasattr(provider, "complete")):
            raise ConfigError(f"provider must be a Provider or a mapping of them, got {provider!r:.60}")
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a Scheduler, got {type(scheduler).__name__}")
        if spec.mode == "output" and provider is None:
            raise ConfigError("an output-space merged model needs the provider that reaches its models")
        if spec.mode == "provider" and client is None:
            raise ConfigError("a provider-side merged model needs a MergeServiceClient")
        self.spec = spec
        self.provider = provider
        self.client = client
        self._own_scheduler = scheduler is None and spec.mode == "output"
        self.scheduler = (
            scheduler if scheduler is not None else (Scheduler() if spec.mode == "output" else None)
        )
        self.answer_set = AnswerSet(spec.answer_set) if spec.mode == "output" else None
        self.models_queried: Counter[str] = Counter()
        self._session: ServiceSession | None = None
        self._lock = anyio.Lock()
        self._opened = False

    @property
    def name(self) -> str:
        """The model name it answers as."""
        return self.spec.name

    async def __aenter__(self) -> MergedModel:
        if self._own_scheduler and self.scheduler is not None:
            await self.scheduler.__aenter__()
        self._opened = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the scheduler it opened (the provider and client stay the caller's)."""
        if self._own_scheduler and self._opened and self.scheduler is not None:
            self._opened = False
            await self.scheduler.__aexit__(None, None, None)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (`load_spec` reads it back)."""
        return save_spec(self.spec, path)

    async def complete(
        self, messages: str | Sequence[Message] | Sequence[Mapping[str, str]], *, max_tokens: int = 1
    ) -> Completion:
        """The merged model's answer to a chat, with the usage of every query it made.

        Output mode scores the chat's answer options with one query per model (`max_tokens` does not
        apply: the answer is one option); provider mode sends the merge service the last user message
        as its prompt, since the service completes prompts, not chats.
        """
        chat = _messages(messages)
        if self.spec.mode == "output":
            return await self._complete_output(chat)
        return await self._complete_provider(chat, max_tokens)

    async def _complete_output(self, chat: tuple[Message, ...]) -> Completion:
        spec, scheduler, provider, answers = self.spec, self.scheduler, self.provider, self.answer_set
        assert scheduler is not None and provider is not None and answers is not None
        asked = spec.queried_models()
        rows: dict[str, Any] = {}
        usage = [Usage()]

        async def one(model: str) -> None:
            chosen = provider_for(provider, model)
            row, used, _ = await score_prompt(scheduler, chosen, model, chat, answers, spec.scoring)
            rows[model] = row
            usage.append(used)
            self.models_queried[model] += 1

        async with anyio.create_task_group() as tg:
            for model in asked:
                tg.start_soon(one, model)
        if spec.reference == MEAN_REFERENCE:
            z = np.stack([rows[m] for m in spec.pool])
            merged = merge_outputs(z.mean(axis=0), z, spec.alpha, spec.beta)
        else:
            keep = [i for i, m in enumerate(spec.pool) if m in spec.active]
            if keep:
                z = np.stack([rows[spec.pool[i]] for i in keep])
                a = [spec.alpha[i] for i in keep]
                b = [spec.beta[i] for i in keep]
                merged = merge_outputs(rows[spec.reference], z, a, b)
            else:
                merged = np.asarray(rows[spec.reference], dtype=np.float64)
        logp = log_softmax(merged)
        order = np.argsort(-logp, kind="stable")
        best = int(order[0])
        top = tuple((answers.options[int(i)], float(logp[i])) for i in order)
        total = Usage()
        for u in usage:
            total = total + u
        return Completion(
            text=answers.options[best],
            model=spec.name,
            finish_reason="stop",
            logprobs=(TokenLogprob(answers.options[best], float(logp[best]), top),),
            usage=total,
        )

    async def _complete_provider(self, chat: tuple[Message, ...], max_tokens: int) -> Completion:
        client, spec = self.client, self.spec
        assert client is not None and spec.preset_id is not None
        async with self._lock:
            if self._session is None:
                self._session = await client.create_session(spec.preset_id)
        prompt = next((m.content for m in reversed(chat) if m.role == "user"), None)
        if prompt is None:
            raise ConfigError("a completion needs a user message")
        out = await client.complete(
            self._session, spec.alpha, spec.beta, prompt, max_tokens=max_tokens, top_logprobs=20
        )
        self.models_queried["merge-service"] += 1
        return Completion(
            text=out.text,
            model=spec.name,
            finish_reason=out.finish_reason,
            logprobs=out.logprobs or None,
            usage=out.usage,
        )


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


@asynccontextmanager
async def open_merged(
    spec: MergedSpec,
    *,
    base_url: str | None = None,
    upstream_api_key: str | None = None,
    scheduler: Scheduler | None = None,
) -> AsyncIterator[MergedModel]:
    """A ready `MergedModel` for `spec`: the models are reached at `base_url` (an OpenAI-compatible
    `/v1` URL in output mode, a merge service in provider mode) or, when the spec came from the
    embedded repository and no URL is given, on an embedded service started here for the block."""
    if not isinstance(spec, MergedSpec):
        raise ConfigError(f"spec must be a MergedSpec (see load_spec), got {type(spec).__name__}")
    async with AsyncExitStack() as stack:
        url = base_url
        if url is None:
            if spec.source.get("kind") != "embedded":
                raise ConfigError(
                    "this merged model's models live on a server of their own: pass base_url "
                    f"(its source is {dict(spec.source)})"
                )
            url = await stack.enter_async_context(_embedded_service(spec.source))
            url = url + "/v1" if spec.mode == "output" else url
        if spec.mode == "output":
            from .providers import load_provider

            provider = load_provider("openai", base_url=url, api_key=upstream_api_key)
            stack.push_async_callback(provider.aclose)
            model = MergedModel(spec, provider=provider, scheduler=scheduler)
        else:
            from .service import MergeServiceClient

            client = await stack.enter_async_context(
                MergeServiceClient(url, api_key=upstream_api_key, scheduler=scheduler)
            )
            model = MergedModel(spec, client=client)
        yield await stack.enter_async_context(model)


@asynccontextmanager
async def _embedded_service(source: Mapping[str, Any]) -> AsyncIterator[str]:
    """The embedded service a spec's models came from (same repository and pool), on a free port."""
    from .local.repository import RepositoryConfig
    from .local.server import LocalService

    try:
        seed = int(source.get("repository_seed", 0))
        config = (
            RepositoryConfig.small(seed) if source.get("small_repository") else RepositoryConfig(seed=seed)
        )
        pool_size = int(source["pool_size"])
        pool_seed = int(source.get("pool_seed", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the merged model's embedded source is incomplete: {exc}") from exc
    async with LocalService(
        repository_config=config, pool_sizes=(pool_size,), pool_seed=pool_seed
    ) as service:
        yield service.url
