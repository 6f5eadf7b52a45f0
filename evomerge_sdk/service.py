"""The client of the merge-service protocol (DESIGN 3); `objectives.ServiceObjective` is the search's
objective over it.

    async with MergeServiceClient("http://127.0.0.1:8080", scheduler=scheduler) as client:
        validation = await client.create_session("ood:ner/news/pool-20")
        result = await EvoMerge(ServiceObjective(client, validation), validation.adapter_count).run()

Every billable call (evaluate, complete) goes through `Scheduler.call`: it reserves its worst case in
tokens under the hard budget, waits for the RPM/TPM limiter, is retried on 429/5xx/timeouts/dropped
connections, and is cached. The cache key is what the answer depends on (the preset, the session's
query_plus and model as sent, the server's revision when it reports one, the exact vectors and the
examples), never the session id, which changes with every run: a SQLite cache reused after a restart
answers the same evaluations without paying again. Control calls (create_session, materialize) go
through the scheduler too, for its retries and limits, at no token cost.

The client speaks the reference protocol and uses the embedded service's extensions only when
`GET /health` lists them: `usage` (otherwise each evaluation is charged `tokens_per_evaluation`, an
estimate you can set), `metrics`, `minibatch` (otherwise minibatch requests fall back to full evaluations,
logged once), `complete` and `delete_session`. So it works unchanged against the authors' service.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import attrs
import numpy as np
from numpy.typing import ArrayLike

from ._checks import check_number, is_int, is_real
from ._io import canonical_json
from ._logs import get_logger
from .engine._operators import check_coefficients
from .errors import BadResponse, ConfigError
from .http.client import HTTPClient, check_base_url, parse_openai_rate_limits
from .providers import Message, RateLimitInfo, TokenLogprob, Usage, as_messages, check_text
from .scheduler import Outcome, Scheduler, cache_key

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TOKENS_PER_EVALUATION",
    "Evaluation",
    "Materialized",
    "MergeServiceClient",
    "ServiceCompletion",
    "ServicePreset",
    "ServiceSession",
]

_log = get_logger("evomerge_sdk.service")

DEFAULT_MAX_TOKENS = 256
"""The longest answer `MergeServiceClient.complete` asks for when the caller sets no `max_tokens` (the
budget reserves it; a next-token model such as the embedded one answers one token anyway)."""
DEFAULT_TOKENS_PER_EVALUATION = 300 * 256
"""What one evaluation is assumed to cost when the server reports neither usage nor its dataset's size:
the paper's 300 validation samples at 256 tokens each. Set `tokens_per_evaluation` for your service."""

_NO_COST = Usage(0, 0)


def _never_final(_error: Mapping[str, Any]) -> bool:
    # The merge service has no quota 429s: every 429 is a rate limit worth waiting for.
    return False


@attrs.frozen
class ServicePreset:
    """A pool the service offers: its id, adapters and the datasets sessions may name."""

    preset_id: str
    adapter_count: int
    adapters: tuple[str, ...]
    datasets: tuple[str, ...]
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class ServiceSession:
    """An open session: what it scores and what one evaluation may cost.

    `n_examples`, `tokens_per_evaluation` and `tokens_per_example` come from the server when it reports
    them (the embedded service does); `tokens_per_evaluation` falls back to the client's estimate.
    `minibatch` says whether evaluations of this session can score a subset of its examples.
    """

    session_id: str
    preset_id: str
    adapter_count: int
    query_plus: Mapping[str, Any]
    n_examples: int | None
    tokens_per_evaluation: int
    tokens_per_example: int | None
    minibatch: bool
    fingerprint: str = attrs.field(repr=False)
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class Evaluation:
    """One evaluation's answer: the loss (NaN if the service could not score the merge), its usage,
    the metrics the service reports (None otherwise), and whether it came from the cache."""

    loss: float
    usage: Usage
    accuracy: float | None = None
    macro_f1: float | None = None
    n_examples: int | None = None
    cached: bool = False
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen
class Materialized:
    """Where the service put a merged adapter."""

    path: str
    adapter_name: str | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class ServiceCompletion:
    """A completion of the merged model: its text, per-token log-probabilities, usage and why it stopped."""

    text: str
    logprobs: tuple[TokenLogprob, ...]
    usage: Usage
    cached: bool = False
    finish_reason: str | None = None


def _check_session(session: object) -> None:
    if not isinstance(session, ServiceSession):
        raise ConfigError(f"session must be a ServiceSession (from create_session), got {session!r:.60}")


def _number(value: Any, where: str, *, allow_null: bool = False) -> float | None:
    if value is None and allow_null:
        return None
    if not is_real(value):
        raise BadResponse(f"{where} should be a number, got {value!r:.80}")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise BadResponse(f"{where} should be a non-negative integer, got {value!r:.80}")
    return value


def _answer_usage(data: Mapping[str, Any]) -> Usage | None:
    usage = data.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise BadResponse("answer.usage is not an object")
    return Usage(
        _count(usage.get("input_tokens"), "usage.input_tokens") or 0,
        _count(usage.get("output_tokens"), "usage.output_tokens") or 0,
    )


def _vectors(alpha: ArrayLike, beta: ArrayLike, n: int) -> tuple[list[float], list[float]]:
    """alpha and beta as lists of n finite floats, alpha in [0, 1]: refused here, before any request."""
    a, b = check_coefficients(alpha, beta, n)
    return a.tolist(), b.tolist()


def _indices(examples: ArrayLike | None, n: int | None) -> list[int] | None:
    if examples is None:
        return None
    idx = np.asarray(examples)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError("examples must be a non-empty vector of integer indices")
    if np.any(np.diff(idx) <= 0) or idx[0] < 0 or (n is not None and idx[-1] >= n):
        raise ConfigError(f"examples must be sorted, distinct indices in [0, {n})")
    return [int(i) for i in idx]


class MergeServiceClient:
    """A client of a merge service (the embedded one or the authors'): `async with` it.

    `scheduler`: the `Scheduler` every call goes through (budget, limits, retries, cache), opened by the
    caller; without one the client opens its own (in-memory cache, default retries). `model` is the name
    the scheduler prices and limits these calls under (give it a `Price` with a USD budget).
    `tokens_per_evaluation` is the cost assumed for an evaluation when the server does not report one.
    `cache_namespace` separates the cache entries of services that reuse preset names for other data.
    The API key is sent as a bearer token and never appears in errors, logs or repr.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        scheduler: Scheduler | None = None,
        model: str = "merge-service",
        timeout: float = 60.0,
        verify_tls: bool | ssl.SSLContext = True,
        session: aiohttp.ClientSession | None = None,
        tokens_per_evaluation: int = DEFAULT_TOKENS_PER_EVALUATION,
        cache_namespace: str = "",
    ) -> None:
        self.base_url = check_base_url(base_url, "base_url")
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a Scheduler, got {type(scheduler).__name__}")
        check_number("tokens_per_evaluation", tokens_per_evaluation, integer=True)
        if not isinstance(model, str) or not model:
            raise ConfigError("model must be a non-empty string")
        self.model = model
        self.tokens_per_evaluation = tokens_per_evaluation
        self.cache_namespace = str(cache_namespace)
        self._own_scheduler = scheduler is None
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HTTPClient(
            provider="merge-service",
            timeout=timeout,
            verify_tls=verify_tls,
            session=session,
            secrets=[api_key or ""],
        )
        self._extensions: tuple[str, ...] | None = None
        self._revision: str | None = None

    def __repr__(self) -> str:
        return f"MergeServiceClient(base_url={self.base_url!r}, model={self.model!r})"

    async def __aenter__(self) -> MergeServiceClient:
        if self._own_scheduler:
            await self.scheduler.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections (and the scheduler the client opened itself)."""
        try:
            await self._http.aclose()
        finally:
            if self._own_scheduler:
                self._own_scheduler = False
                await self.scheduler.__aexit__(None, None, None)

    # -- plumbing --------------------------------------------------------------------------------
    async def _bodiless(self, method: str, *path: str) -> Any:
        # GET and DELETE: no body, no scheduler (they bill nothing), the same failure mapping as POSTs.
        url = self._url(*path)
        return await self._http.request(method, url, self._headers, rate_limits=parse_openai_rate_limits)

    def _url(self, *parts: str) -> str:
        return self.base_url + "/" + "/".join(quote(p, safe="") for p in parts)

    async def _post(self, url: str, body: Mapping[str, Any]) -> tuple[Any, RateLimitInfo | None]:
        data, limits = await self._http.exchange(
            url, body, self._headers, {}, rate_limits=parse_openai_rate_limits, final_429=_never_final
        )
        if not isinstance(data, dict):
            raise BadResponse(f"merge-service answered {type(data).__name__}, not a JSON object")
        return data, limits

    async def _control(self, url: str, body: Mapping[str, Any], label: str) -> dict[str, Any]:
        """A non-billable POST through the scheduler (retries and limits, no token cost, no cache)."""

        async def send() -> Outcome:
            data, limits = await self._post(url, body)
            return Outcome(data, _NO_COST, limits)

        result = await self.scheduler.call(send, model=self.model, reserve=_NO_COST, label=label)
        value: dict[str, Any] = result.value
        return value

    # -- routes ----------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """`GET /health`; remembers the extensions the server lists."""
        data = await self._bodiless("GET", "health")
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise BadResponse(f"merge-service health answer is not {{'status': 'ok'}}: {data!r:.120}")
        ext = data.get("extensions")
        self._extensions = tuple(str(e) for e in ext) if isinstance(ext, list) else ()
        revision = data.get("revision")
        self._revision = revision if isinstance(revision, str) else None
        return data

    async def extensions(self) -> tuple[str, ...]:
        """The protocol extensions the server offers (empty for a reference-only server)."""
        if self._extensions is None:
            await self.health()
        assert self._extensions is not None
        return self._extensions

    async def presets(self) -> list[ServicePreset]:
        """`GET /v1/presets`: the pools on offer."""
        data = await self._bodiless("GET", "v1", "presets")
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise BadResponse("the presets answer has no items list")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("preset_id"), str):
                raise BadResponse(f"presets.items[{i}] has no preset_id")
            adapters = item.get("adapters") or []
            datasets = item.get("datasets") or []
            count = _count(item.get("adapter_count"), f"presets.items[{i}].adapter_count")
            out.append(
                ServicePreset(
                    preset_id=item["preset_id"],
                    adapter_count=count if count is not None else len(adapters),
                    adapters=tuple(str(a) for a in adapters),
                    datasets=tuple(str(d) for d in datasets),
                    raw=item,
                )
            )
        return out

    async def create_session(
        self,
        preset_id: str,
        *,
        query_plus: Mapping[str, Any] | None = None,
        model_name_or_path: str | None = None,
        tokens_per_evaluation: int | None = None,
    ) -> ServiceSession:
        """`POST /v1/sessions`: a session scoring `query_plus`'s data (the server's default when None)."""
        if not isinstance(preset_id, str) or not preset_id:
            raise ConfigError("preset_id must be a non-empty string")
        if tokens_per_evaluation is not None:
            check_number("tokens_per_evaluation", tokens_per_evaluation, integer=True)
        extensions = await self.extensions()
        body: dict[str, Any] = {"preset_id": preset_id}
        if model_name_or_path is not None:
            body["model_name_or_path"] = model_name_or_path
        if query_plus is not None:
            if not isinstance(query_plus, Mapping):
                raise ConfigError(f"query_plus must be a mapping (a JSON object), got {query_plus!r:.60}")
            body["query_plus"] = dict(query_plus)
        try:
            canonical_query = canonical_json(body.get("query_plus"), strict=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"query_plus must be JSON-serialisable with finite numbers: {exc}") from None
        data = await self._control(self._url("v1", "sessions"), body, "create_session")
        sid = data.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise BadResponse("the session answer has no session_id")
        count = _count(data.get("adapter_count"), "session.adapter_count")
        if not count:
            raise BadResponse("the session answer has no adapter_count")
        n_examples = _count(data.get("n_examples"), "session.n_examples")
        per_eval = _count(data.get("max_tokens_per_evaluation"), "session.max_tokens_per_evaluation")
        per_example = _count(data.get("max_tokens_per_example"), "session.max_tokens_per_example")
        revision = data.get("revision") if isinstance(data.get("revision"), str) else self._revision
        fingerprint = cache_key(
            "evomerge/service/session/v1",
            self.cache_namespace,
            preset_id,
            revision or "",
            model_name_or_path or "",
            canonical_query,
        )
        return ServiceSession(
            session_id=sid,
            preset_id=preset_id,
            adapter_count=count,
            query_plus=dict(query_plus or {}),
            n_examples=n_examples,
            tokens_per_evaluation=per_eval or tokens_per_evaluation or self.tokens_per_evaluation,
            tokens_per_example=per_example,
            minibatch="minibatch" in extensions and n_examples is not None,
            fingerprint=fingerprint,
            raw=data,
        )

    async def delete_session(self, session: ServiceSession) -> bool:
        """Free a session on the server (an extension); False when the server cannot delete sessions."""
        if "delete_session" not in await self.extensions():
            return False
        await self._bodiless("DELETE", "v1", "sessions", session.session_id)
        return True

    def worst_case(self, session: ServiceSession, examples: Sequence[int] | None) -> int:
        """Tokens an evaluation of `examples` (None: all) may cost at most: its budget reservation."""
        total = session.tokens_per_evaluation
        if examples is None or session.tokens_per_example is None:
            return total
        return min(total, len(examples) * session.tokens_per_example)

    async def evaluate(
        self,
        session: ServiceSession,
        alpha: ArrayLike,
        beta: ArrayLike,
        *,
        examples: ArrayLike | None = None,
        tag: str | None = None,
        cache: bool = True,
    ) -> Evaluation:
        """The merge's loss on the session's data (`examples`: a sorted subset of its indices)."""
        _check_session(session)
        a, b = _vectors(alpha, beta, session.adapter_count)
        idx = _indices(examples, session.n_examples)
        if idx is not None and not session.minibatch:
            raise ConfigError("this service cannot score a subset of examples (no minibatch extension)")
        body: dict[str, Any] = {"alpha": a, "beta": b}
        if tag is not None:
            body["tag"] = tag
        if idx is not None:
            body["examples"] = idx
        reserve = Usage(self.worst_case(session, idx), 0)
        key = None
        if cache:
            key = cache_key(
                "evomerge/service/evaluate/v1", session.fingerprint, repr(a), repr(b), repr(idx)
            )  # repr of floats round-trips exactly
        url = self._url("v1", "sessions", session.session_id, "evaluate")

        async def send() -> Outcome:
            data, limits = await self._post(url, body)
            if "loss" not in data:  # null is "could not score"; absent is a broken answer, never a NaN
                raise BadResponse("answer.loss is missing from the evaluate answer")
            loss = _number(data.get("loss"), "answer.loss", allow_null=True)
            value = {k: v for k, v in data.items() if k not in ("session_id", "tag", "usage")}
            value["loss"] = loss
            # Without reported usage the estimate is charged: the budget stays hard.
            return Outcome(value, _answer_usage(data) or reserve, limits)

        result = await self.scheduler.call(
            send, model=self.model, reserve=reserve, cache_key=key, label="evaluate"
        )
        value = result.value
        loss = value.get("loss")
        return Evaluation(
            loss=math.nan if loss is None else float(loss),
            usage=result.usage,
            accuracy=_number(value.get("accuracy"), "answer.accuracy", allow_null=True),
            macro_f1=_number(value.get("macro_f1"), "answer.macro_f1", allow_null=True),
            n_examples=_count(value.get("n_examples"), "answer.n_examples"),
            cached=result.cached,
            raw=value,
        )

    async def materialize(
        self, session: ServiceSession, alpha: ArrayLike, beta: ArrayLike, *, tag: str | None = None
    ) -> Materialized:
        """`POST .../materialize`: have the service write the merged adapter; where it went."""
        _check_session(session)
        a, b = _vectors(alpha, beta, session.adapter_count)
        body: dict[str, Any] = {"alpha": a, "beta": b}
        if tag is not None:
            body["tag"] = tag
        data = await self._control(
            self._url("v1", "sessions", session.session_id, "materialize"), body, "materialize"
        )
        path = data.get("path")
        if not isinstance(path, str):
            raise BadResponse("the materialize answer has no path")
        name = data.get("adapter_name")
        return Materialized(path=path, adapter_name=name if isinstance(name, str) else None, raw=data)

    async def complete(
        self,
        session: ServiceSession,
        alpha: ArrayLike,
        beta: ArrayLike,
        prompt: str | Sequence[Message],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        top_logprobs: int = 0,
        temperature: float | None = None,
        seed: int | None = None,
        cache: bool = True,
    ) -> ServiceCompletion:
        """A completion by the merged model (the `complete` extension) of `prompt`: a text, or a whole
        chat that the service renders through its model's chat template. `max_tokens` bounds the answer
        (and is what the budget reserves for it)."""
        if "complete" not in await self.extensions():
            raise ConfigError("this service has no completions for merged models (no 'complete' extension)")
        _check_session(session)
        if isinstance(prompt, str):
            if not check_text(prompt, "prompt").strip():
                raise ConfigError("prompt must be a non-empty string")
            asked: dict[str, Any] = {"prompt": prompt}
            text = prompt
        else:
            chat = as_messages(prompt)
            if not any(m.role == "user" for m in chat):
                raise ConfigError("a chat needs a user message")
            asked = {"messages": [{"role": m.role, "content": m.content} for m in chat]}
            text = "\n".join(m.content for m in chat)
        if not is_int(max_tokens) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise ConfigError(f"temperature must be a finite number >= 0 or None, got {temperature!r}")
        a, b = _vectors(alpha, beta, session.adapter_count)
        body: dict[str, Any] = {"alpha": a, "beta": b, **asked, "max_tokens": max_tokens}
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
        # A token is at least one byte, so the prompt's UTF-8 length bounds its tokens (plus a few per
        # message for the chat template).
        reserve = Usage(len(text.encode("utf-8")) + 8 * (1 + len(asked.get("messages", ()))), max_tokens)
        key = (
            cache_key("evomerge/service/complete/v1", session.fingerprint, canonical_json(body, strict=True))
            if cache
            else None
        )
        url = self._url("v1", "sessions", session.session_id, "complete")

        async def send() -> Outcome:
            data, limits = await self._post(url, body)
            value = {k: data.get(k) for k in ("text", "logprobs", "finish_reason")}
            if not isinstance(value["text"], str):
                raise BadResponse("the completion answer has no text")
            return Outcome(value, _answer_usage(data) or reserve, limits)

        result = await self.scheduler.call(
            send, model=self.model, reserve=reserve, cache_key=key, label="complete"
        )
        logprobs = []
        for item in result.value.get("logprobs") or []:
            top = tuple((str(t["token"]), float(t["logprob"])) for t in item.get("top_logprobs") or [])
            logprobs.append(TokenLogprob(str(item["token"]), float(item["logprob"]), top))
        finish = result.value.get("finish_reason")
        return ServiceCompletion(
            result.value["text"],
            tuple(logprobs),
            result.usage,
            result.cached,
            finish if isinstance(finish, str) else None,
        )
