"""The merged model as a thing to use: `await merged.complete(messages)`, like any chat model.

Two modes, one interface, one class each (`MergedModel(spec, ...)` builds the one of `spec.mode`):

* `OutputMergedModel`, output space (DESIGN 1.2): each prompt is scored by the reference (a named base
  model) and by every pool model whose alpha and beta are both non-zero, through the `Scheduler` (cached,
  budgeted, retried); their option scores are merged with the found vectors and the answer is the best
  option. Models with a zero weight are never queried. (With the pool mean as reference, the mean needs
  every model, so all are queried.)
* `ProviderMergedModel`, provider side (DESIGN 1.1): the merge service answers with the merged weights
  (`/complete` of the embedded service, through `MergeServiceClient`).

`open_merged` builds the ready model for a `MergedSpec` (`merged.spec`), reaching its models at a URL or
on an embedded service it starts.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from .._concurrency import run_concurrently
from ..engine._operators import merge_outputs
from ..errors import ConfigError, UsageError
from ..objectives.metrics import log_softmax
from ..objectives.output import MEAN_REFERENCE, AnswerSet, Providers, provider_for, score_prompt
from ..providers import Completion, Message, Provider, TokenLogprob, Usage, as_messages
from ..scheduler import Scheduler
from ..service import DEFAULT_MAX_TOKENS
from .spec import MergedSpec, save_spec

if TYPE_CHECKING:
    from ..service import MergeServiceClient, ServiceSession

__all__ = ["MergedModel", "OutputMergedModel", "ProviderMergedModel", "open_merged"]


def _messages(messages: str | Sequence[Message] | Sequence[Mapping[str, str]]) -> tuple[Message, ...]:
    out = as_messages(messages)
    if not out:
        raise ConfigError("a completion needs at least one message")
    return out


class MergedModel:
    """The merged model of a search, used like a chat model: `await merged.complete(messages)`.

    `MergedModel(spec, ...)` builds the class of the spec's mode. Output mode (`OutputMergedModel`) takes
    the `provider` that reaches the pool's models and the reference (or a mapping of model name to
    provider, for a pool spread over several APIs) and, optionally, a `scheduler` (otherwise it opens its
    own, with an in-memory cache). Provider mode (`ProviderMergedModel`) takes a `MergeServiceClient` (its
    scheduler is used). Use it as `async with MergedModel(...) as merged:` so what it opened is closed;
    `models_queried` counts requests per model.
    """

    def __new__(cls, spec: MergedSpec, **_settings: Any) -> MergedModel:
        # Dispatch here rather than in a factory, so `MergedModel(spec, ...)` keeps working as documented.
        if cls is MergedModel:
            if not isinstance(spec, MergedSpec):
                raise ConfigError(f"spec must be a MergedSpec, got {type(spec).__name__}")
            cls = OutputMergedModel if spec.mode == "output" else ProviderMergedModel
        return super().__new__(cls)

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
        self.spec = spec
        self.provider = provider
        self.client = client
        self.scheduler = scheduler
        self._own_scheduler = False
        self.models_queried: Counter[str] = Counter()
        self._opened = False
        self._bind(provider, client, scheduler)

    def _bind(
        self, provider: Providers | None, client: MergeServiceClient | None, scheduler: Scheduler | None
    ) -> None:
        """Check and keep what this mode needs (each mode class says what)."""
        raise NotImplementedError  # every MergedModel is one of the two mode classes below

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
        opened, self._opened = self._opened, False
        if self._own_scheduler and opened and self.scheduler is not None:
            await self.scheduler.__aexit__(None, None, None)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (`load_spec` reads it back)."""
        return save_spec(self.spec, path)

    async def complete(
        self,
        messages: str | Sequence[Message] | Sequence[Mapping[str, str]],
        *,
        max_tokens: int | None = None,
    ) -> Completion:
        """The merged model's answer to a whole chat, with the usage of every query it made.

        Output mode scores the chat's answer options with one query per model (`max_tokens` does not
        apply: the answer is one option); provider mode sends the merge service the whole chat, which it
        renders through its model's chat template, and `max_tokens` None leaves the length to the
        service client's default. A failed query raises the SDK's own error (the first failure, the
        others attached), never an ExceptionGroup.
        """
        if not self._opened:
            raise UsageError(
                "open the merged model first: `async with MergedModel(...) as merged:` (or open_merged)"
            )
        return await self._complete(_messages(messages), max_tokens)

    async def _complete(self, chat: tuple[Message, ...], max_tokens: int | None) -> Completion:
        raise NotImplementedError  # every MergedModel is one of the two mode classes below


class OutputMergedModel(MergedModel):
    """Output-space merging: the option scores of the reference and the active pool models, merged."""

    def _bind(
        self, provider: Providers | None, client: MergeServiceClient | None, scheduler: Scheduler | None
    ) -> None:
        spec = self.spec
        if spec.mode != "output":
            raise ConfigError(f"an OutputMergedModel needs an output-mode spec, got mode {spec.mode!r}")
        if provider is None:
            raise ConfigError("an output-space merged model needs the provider that reaches its models")
        self._provider: Providers = provider
        self._own_scheduler = scheduler is None
        self._scheduler: Scheduler = scheduler if scheduler is not None else Scheduler()
        self.scheduler = self._scheduler
        self.answer_set = AnswerSet(spec.answer_set)

    async def _complete(self, chat: tuple[Message, ...], max_tokens: int | None) -> Completion:
        spec, scheduler, provider, answers = self.spec, self._scheduler, self._provider, self.answer_set
        asked = spec.queried_models()
        rows: dict[str, Any] = {}
        usage = [Usage()]

        async def one(model: str) -> None:
            chosen = provider_for(provider, model)
            row, used, _ = await score_prompt(scheduler, chosen, model, chat, answers, spec.scoring)
            rows[model] = row
            usage.append(used)
            self.models_queried[model] += 1

        await run_concurrently([functools.partial(one, model) for model in asked])
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


class ProviderMergedModel(MergedModel):
    """Provider-side merging: the merge service completes the prompt with the merged weights."""

    def _bind(
        self, provider: Providers | None, client: MergeServiceClient | None, scheduler: Scheduler | None
    ) -> None:
        spec = self.spec
        if spec.mode != "provider":
            raise ConfigError(f"a ProviderMergedModel needs a provider-mode spec, got mode {spec.mode!r}")
        if client is None:
            raise ConfigError("a provider-side merged model needs a MergeServiceClient")
        self._client: MergeServiceClient = client
        self._session: ServiceSession | None = None
        self._lock = anyio.Lock()

    async def _complete(self, chat: tuple[Message, ...], max_tokens: int | None) -> Completion:
        client, spec = self._client, self.spec
        assert spec.preset_id is not None
        async with self._lock:
            if self._session is None:
                self._session = await client.create_session(spec.preset_id)
        if not any(m.role == "user" for m in chat):
            raise ConfigError("a completion needs a user message")
        length = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        out = await client.complete(
            self._session, spec.alpha, spec.beta, chat, max_tokens=length, top_logprobs=20
        )
        self.models_queried["merge-service"] += 1
        return Completion(
            text=out.text,
            model=spec.name,
            finish_reason=out.finish_reason,
            logprobs=out.logprobs or None,
            usage=out.usage,
        )


@asynccontextmanager
async def open_merged(
    spec: MergedSpec,
    *,
    base_url: str | None = None,
    upstream_api_key: str | None = None,
    scheduler: Scheduler | None = None,
    providers: Mapping[str, Provider] | None = None,
) -> AsyncIterator[MergedModel]:
    """A ready `MergedModel` for `spec`. Its models are reached through `providers` (output mode: one per
    model, for a pool spread over several APIs; they stay the caller's), else at `base_url` (an
    OpenAI-compatible `/v1` URL in output mode, a merge service in provider mode), else at the
    `base_url` the spec's source records, else, when the spec came from the embedded repository, on an
    embedded service started here for the block."""
    if not isinstance(spec, MergedSpec):
        raise ConfigError(f"spec must be a MergedSpec (see load_spec), got {type(spec).__name__}")
    async with AsyncExitStack() as stack:
        if providers is not None and spec.mode == "output":
            yield await stack.enter_async_context(MergedModel(spec, provider=providers, scheduler=scheduler))
            return
        url = base_url if base_url is not None else spec.source.get("base_url")
        if url is None:
            if spec.source.get("kind") != "embedded":
                raise ConfigError(
                    "this merged model's models live on a server of their own: pass base_url "
                    f"(its source is {dict(spec.source)})"
                )
            url = await stack.enter_async_context(_embedded_service(spec.source))
            url = url + "/v1" if spec.mode == "output" else url
        if spec.mode == "output":
            from ..providers import load_provider

            provider = load_provider("openai", base_url=url, api_key=upstream_api_key)
            stack.push_async_callback(provider.aclose)
            model = MergedModel(spec, provider=provider, scheduler=scheduler)
        else:
            from ..service import MergeServiceClient

            client = await stack.enter_async_context(
                MergeServiceClient(url, api_key=upstream_api_key, scheduler=scheduler)
            )
            model = MergedModel(spec, client=client)
        yield await stack.enter_async_context(model)


@asynccontextmanager
async def _embedded_service(source: Mapping[str, Any]) -> AsyncIterator[str]:
    """The embedded service a spec's models came from (same repository and pool), on a free port."""
    from ..local.repository import RepositoryConfig
    from ..local.server import LocalService

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
