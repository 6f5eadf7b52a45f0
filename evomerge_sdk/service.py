"""The client of the merge-service protocol (DESIGN 3); `objectives.ServiceObjective` is the search's
objective over it.

    async with MergeServiceClient("http://127.0.0.1:8080", scheduler=scheduler) as client:
        validation = await client.create_session("ood:ner/news/pool-20")
        result = await EvoMerge(ServiceObjective(client, validation), validation.adapter_count).run()

Every billable call (evaluate, complete, optimize) goes through `Scheduler.call`: it reserves its worst
case in tokens under the hard budget, waits for the RPM/TPM limiter, is retried on 429/5xx/timeouts/dropped
connections, and is cached. The cache key is what the answer depends on (the preset, the session's
query_plus and model as sent, the server's revision when it reports one, the exact vectors and the
examples), never the session id, which changes with every run: a SQLite cache reused after a restart
answers the same evaluations without paying again. Control calls (create_session, materialize) go
through the scheduler too, for its retries and limits, at no token cost.

The client speaks the authors' reference service as it really answers (DESIGN 3), and uses the embedded
service's extensions only when `GET /health` lists them (`usage`, `metrics`, `minibatch`, `complete`,
`delete_session`), and its `"concurrent_evaluation": "safe"`:

- Budget: an evaluation reserves what it asks for: the examples it scores (the minibatch's indices;
  else the `batch_size x evaluation_batches` or inline examples of the query_plus the session sent)
  times `tokens_per_example` (default 2,048, the reference's `cutoff_len`; capped by the `cutoff_len`
  the session sends). Only a session opened without a query_plus that says so takes the count from the
  server's answer (its echoed query_plus, else its `n_examples`): send one to keep the server's word
  out of the reservation. Without usable `usage` in the answer (absent, null, empty) the whole
  reservation is charged; usage beyond the reservation is a `BadResponse`, charged the reservation.
- Concurrency: evaluations of one session run one at a time per replica unless the server's `/health`
  says `"concurrent_evaluation": "safe"` (the reference shares one model and one artifact folder between
  them, so concurrent evaluations silently score the wrong adapters); `max_concurrent_evaluations`
  overrides it.
- Failures: from a server that declares no extensions (the reference), a 500 is retried once and a second
  500 is final, carrying the server's message (the reference answers 500 for an unknown preset, an
  unloadable dataset, and a loss JSON cannot carry); on evaluate, once the session has scored a finite
  loss, that second 500 is a NaN loss: the search ranks the candidate worst and counts it, as it does any
  non-finite loss. A server with extensions answers 500 only for its own trouble: retried as usual.
- query_plus: sent as given to a server with extensions; for the reference, completed from
  `REFERENCE_QUERY_PLUS_DEFAULTS` (it would reset every omitted field to them), `dataset` required and
  fields it does not know (it would ignore them) refused.
- Replicas: given several base URLs, the client opens each session on every replica, sends each
  evaluation to the replica with the fewest in flight, and moves an evaluation whose replica stopped
  answering (connection refused or dropped, timeout) to another one: the scheduler's retry, so its
  reservation is charged as an unknown outcome and the loss is the same, evaluation being deterministic.
- Sessions the client created are deleted when it closes, where the server can (`delete_session`); the
  reference never frees a session (each holds its own copy of the base model): restart it to free memory.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import attrs
import numpy as np
from numpy.typing import ArrayLike

from ._checks import check_number, is_int, is_real
from ._io import canonical_json
from ._logs import get_logger
from .engine._operators import check_coefficients
from .errors import BadResponse, ConfigError, ConnectionFailed, InvalidRequest, RequestTimeout, ServerError
from .http.client import HTTPClient, check_base_url, parse_openai_rate_limits
from .providers import Message, RateLimitInfo, TokenLogprob, Usage, as_messages, check_text
from .scheduler import Outcome, Scheduler, cache_key

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOKENS_PER_EXAMPLE",
    "REFERENCE_QUERY_PLUS_DEFAULTS",
    "Evaluation",
    "Materialized",
    "MergeServiceClient",
    "Optimization",
    "Replica",
    "ServiceCompletion",
    "ServicePreset",
    "ServiceSession",
]

_log = get_logger("evomerge_sdk.service")

DEFAULT_MAX_TOKENS = 256
"""The longest answer `MergeServiceClient.complete` asks for when the caller sets no `max_tokens` (the
budget reserves it; a next-token model such as the embedded one answers one token anyway)."""

DEFAULT_TOKENS_PER_EXAMPLE = 2048
"""The per-example token bound an evaluation reserves by default: the reference's default `cutoff_len`
(it truncates every example to that many tokens). Set `tokens_per_example` to your data's bound."""

DEFAULT_TIMEOUT = 900.0
"""Seconds one request may take: the first evaluation of a reference session loads an 8B base model and
tokenises the data, and each later one scores 300 examples (20 batches of 15) on it."""

REFERENCE_QUERY_PLUS_DEFAULTS: Mapping[str, Any] = {
    "dataset_dir": "data/Userdata",
    "template": "default",
    "cutoff_len": 2048,
    "max_samples": None,
    "batch_size": 15,
    "evaluation_batches": 20,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
    "max_new_tokens": 1024,
    "repetition_penalty": 1.0,
}
"""The reference service's `query_plus` schema defaults (`dataset` has none: it is required). The
reference replaces a preset's whole `query_plus` with the one a session request sends, so every field
that request omits takes these values; the client completes a `query_plus` from them before sending
it to a reference-only server (and says which fields it filled)."""

_NO_COST = Usage(0, 0)


def _never_final(_error: Mapping[str, Any]) -> bool:
    # The merge service has no quota 429s: every 429 is a rate limit worth waiting for.
    return False


@attrs.frozen
class ServicePreset:
    """A pool the service offers: its id and, where the service lists them, adapters and datasets.

    `adapter_count` is None when the service does not say (the reference does not: a session's answer
    carries the count, `ServiceSession.adapter_count`).
    """

    preset_id: str
    adapter_count: int | None
    adapters: tuple[str, ...]
    datasets: tuple[str, ...]
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class ServiceSession:
    """An open session (on every replica): what it scores and what one evaluation may cost.

    `examples_per_evaluation` is what a full evaluation scores at most (from what the client sent when
    it can); `tokens_per_example` the per-example bound its reservations use. `n_examples` is the
    session's example count where the server says it (the embedded service does). `minibatch` says
    whether evaluations can score a subset of the examples. `replica_ids` holds the session's id on
    each replica of the client (None where that replica was down when it was opened).
    """

    session_id: str
    preset_id: str
    adapter_count: int
    query_plus: Mapping[str, Any]
    n_examples: int | None
    examples_per_evaluation: int
    tokens_per_example: int
    minibatch: bool
    fingerprint: str = attrs.field(repr=False)
    replica_ids: tuple[str | None, ...] = attrs.field(default=(), repr=False)
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def tokens_per_evaluation(self) -> int:
        """The reservation of one full evaluation."""
        return self.examples_per_evaluation * self.tokens_per_example


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
    """Where the service put a merged adapter: `path` as the server names it (the reference answers
    `adapter_dir`, relative to its own root folder)."""

    path: str
    adapter_name: str | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class Optimization:
    """The summary of a search the service ran itself (`POST .../optimize`, the reference's pycma run)."""

    best_loss: float
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    adapter_dir: str | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class ServiceCompletion:
    """A completion of the merged model: its text, per-token log-probabilities, usage and why it stopped."""

    text: str
    logprobs: tuple[TokenLogprob, ...]
    usage: Usage
    cached: bool = False
    finish_reason: str | None = None


@attrs.define
class Replica:
    """One replica of the service: its URL, whether it answers, its evaluations in flight, the most it
    had in flight at once, those it answered, and the requests it failed (refused, dropped, timed out)."""

    url: str
    live: bool = True
    in_flight: int = 0
    most_in_flight: int = 0
    evaluations: int = 0
    failures: int = 0


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
    """The answer's usage; None when it reports none the budget can use (absent, null, empty, partial):
    the caller then charges its whole reservation, as for any unknown outcome."""
    usage = data.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise BadResponse("answer.usage is not an object")
    tokens_in = _count(usage.get("input_tokens"), "usage.input_tokens")
    tokens_out = _count(usage.get("output_tokens"), "usage.output_tokens")
    if tokens_in is None or tokens_out is None:
        return None
    return Usage(tokens_in, tokens_out)


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


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _examples_asked(query_plus: Mapping[str, Any]) -> int | None:
    """What one full evaluation scores at most, read from a query_plus: inline examples, or
    `batch_size x evaluation_batches` (the reference's loader draws exactly that many, with repeats)."""
    inline = query_plus.get("examples")
    if isinstance(inline, list) and inline:
        return len(inline)
    size, batches = _positive_int(query_plus.get("batch_size")), query_plus.get("evaluation_batches")
    if size is not None and isinstance(batches, int) and not isinstance(batches, bool):
        return size * max(batches, 1)
    return None


def _final_500(err: ServerError, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"{err} (answered 500 twice to {what}: a failure of this request, not retried further; the "
        "reference service answers 500 for an unknown preset_id, a dataset it cannot load, a vector of "
        "the wrong length and a loss JSON cannot carry)",
        status=500,
    )


def _strike(err: ServerError, strikes: list[int], what: str, reference: bool) -> None:
    """Count a 500 a reference-only server answered to one request; the second is final
    (InvalidRequest, not retried). A server with extensions answers 500 only when something went wrong
    on its side, so its 500s keep the scheduler's retries."""
    if reference and err.status == 500:
        strikes[0] += 1
        if strikes[0] >= 2:
            raise _final_500(err, what) from err


class MergeServiceClient:
    """A client of a merge service (the embedded one, the authors', or several replicas of one):
    `async with` it.

    `base_url`: the service's URL, or a list of its replicas' URLs (each holds every session the client
    opens; evaluations go to the replica with the fewest in flight). `scheduler`: the `Scheduler` every
    call goes through (budget, limits, retries, cache), opened by the caller; without one the client opens
    its own. `model` is the name the scheduler prices and limits these calls under. `timeout` bounds each
    request (the client's calls use it in place of the scheduler's per-attempt timeout, so a scheduler
    sized for chat APIs does not cut an 8B evaluation short). `tokens_per_example` bounds what one
    example costs, for reservations (see the module doc). `max_concurrent_evaluations` is how many
    evaluations of one session may run at once on one replica (None: unlimited where `/health` says
    `"concurrent_evaluation": "safe"`, else 1). `cache_namespace` separates the cache entries of services that
    reuse preset names for other data. The API key is sent as a bearer token and never appears in
    errors, logs or repr.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        scheduler: Scheduler | None = None,
        model: str = "merge-service",
        timeout: float = DEFAULT_TIMEOUT,
        verify_tls: bool | ssl.SSLContext = True,
        session: aiohttp.ClientSession | None = None,
        tokens_per_example: int = DEFAULT_TOKENS_PER_EXAMPLE,
        max_concurrent_evaluations: int | None = None,
        cache_namespace: str = "",
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else base_url
        if not isinstance(urls, Sequence) or not urls:
            raise ConfigError(
                f"base_url must be a URL string or a non-empty list of them, got {base_url!r:.80}"
            )
        self.replicas = tuple(Replica(check_base_url(u, "base_url")) for u in urls)
        if len({r.url for r in self.replicas}) != len(self.replicas):
            raise ConfigError("base_url lists the same replica twice")
        self.base_url = self.replicas[0].url
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a Scheduler, got {type(scheduler).__name__}")
        check_number("tokens_per_example", tokens_per_example, integer=True)
        check_number("max_concurrent_evaluations", max_concurrent_evaluations, integer=True, allow_none=True)
        if not isinstance(model, str) or not model:
            raise ConfigError("model must be a non-empty string")
        self.model = model
        self.tokens_per_example = tokens_per_example
        self.max_concurrent_evaluations = max_concurrent_evaluations
        self.cache_namespace = str(cache_namespace)
        self._own_scheduler = scheduler is None
        self.scheduler = scheduler if scheduler is not None else Scheduler(timeout=None)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HTTPClient(
            provider="merge-service",
            timeout=timeout,
            verify_tls=verify_tls,
            session=session,
            secrets=[api_key or ""],
        )
        self._extensions: tuple[str, ...] | None = None
        self._concurrent = False  # /health says "concurrent_evaluation": "safe"
        self._revision: str | None = None
        self._created: list[ServiceSession] = []
        self._scored: set[str] = set()  # fingerprints of sessions that have scored a finite loss
        self._running: dict[tuple[int, str], int] = {}  # evaluations in flight per (replica, session id)
        self._changed: anyio.Event | None = None

    def __repr__(self) -> str:
        replicas = len(self.replicas)
        return f"MergeServiceClient(base_url={self.base_url!r}, replicas={replicas}, model={self.model!r})"

    async def __aenter__(self) -> MergeServiceClient:
        if self._own_scheduler:
            await self.scheduler.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Delete the sessions this client opened (where the server can), then close connections (and
        the scheduler the client opened itself)."""
        try:
            with anyio.move_on_after(10, shield=True):
                await self._forget_sessions()
        finally:
            try:
                await self._http.aclose()
            finally:
                if self._own_scheduler:
                    self._own_scheduler = False
                    await self.scheduler.__aexit__(None, None, None)

    async def _forget_sessions(self) -> None:
        created, self._created = self._created, []
        if not created or self._extensions is None:
            return
        if "delete_session" not in self._extensions:
            _log.info(
                "sessions_left_open",
                sessions=len(created),
                detail="the service cannot delete sessions (the reference never frees one): restart it "
                "to free their memory",
            )
            return
        for session in created:
            try:
                await self._delete(session)
            except Exception as exc:  # closing goes on: a session the server lost is no failure here
                _log.info("session_not_deleted", session_id=session.session_id, error=type(exc).__name__)

    # -- plumbing --------------------------------------------------------------------------------
    def _url(self, replica: int, *parts: str) -> str:
        return self.replicas[replica].url + "/" + "/".join(quote(p, safe="") for p in parts)

    @staticmethod
    def _ids(session: ServiceSession) -> tuple[str | None, ...]:
        return session.replica_ids or (session.session_id,)

    async def _bodiless(self, method: str, replica: int, *path: str) -> Any:
        # GET and DELETE: no body, no scheduler (they bill nothing), the same failure mapping as POSTs.
        url = self._url(replica, *path)
        return await self._http.request(method, url, self._headers, rate_limits=parse_openai_rate_limits)

    async def _post(
        self, url: str, body: Mapping[str, Any], seconds: float | None = None
    ) -> tuple[dict[str, Any], RateLimitInfo | None]:
        data, limits = await self._http.exchange(
            url,
            body,
            self._headers,
            {},
            rate_limits=parse_openai_rate_limits,
            final_429=_never_final,
            timeout=seconds,
        )
        if not isinstance(data, dict):
            raise BadResponse(f"merge-service answered {type(data).__name__}, not a JSON object")
        return data, limits

    async def _call(
        self, send: Callable[[], Awaitable[Outcome]], reserve: Usage, label: str, key: str | None = None
    ) -> Any:
        # The client's own timeout bounds each request; the scheduler's per-attempt timeout would also
        # bound the wait for a replica's free slot, which serial evaluation makes as long as a generation.
        return await self.scheduler.call(
            send, model=self.model, reserve=reserve, cache_key=key, label=label, attempt_timeout=None
        )

    async def _control(self, url: str, body: Mapping[str, Any], label: str) -> dict[str, Any]:
        """A non-billable POST through the scheduler (retries and limits, no token cost, no cache); a
        second 500 is final."""
        strikes = [0]

        async def send() -> Outcome:
            try:
                data, limits = await self._post(url, body)
            except ServerError as err:
                _strike(err, strikes, label, self._reference())
                raise
            return Outcome(data, _NO_COST, limits)

        result = await self._call(send, _NO_COST, label)
        value: dict[str, Any] = result.value
        return value

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _reference(self) -> bool:
        """Whether the server declares no extensions: it is (or answers like) the authors' service."""
        return self._extensions == ()

    def _limit(self) -> int | None:
        if self.max_concurrent_evaluations is not None:
            return self.max_concurrent_evaluations
        return None if self._concurrent else 1

    async def _acquire(self, session: ServiceSession) -> int:
        """A replica holding `session` with a free slot for it, the one with the fewest evaluations in
        flight (then the fewest done); waits while every holder is busy."""
        ids = self._ids(session)
        holders = [i for i, sid in enumerate(ids) if sid is not None and i < len(self.replicas)]
        if not holders:
            raise ConfigError("this session is not open on any replica of this client")
        limit = self._limit()
        while True:
            if not any(self.replicas[i].live for i in holders):
                for i in holders:  # every holder stopped answering: try them all again
                    self.replicas[i].live = True
            free = [
                i
                for i in holders
                if self.replicas[i].live and (limit is None or self._running.get((i, str(ids[i])), 0) < limit)
            ]
            if free:
                i = min(free, key=lambda j: (self.replicas[j].in_flight, self.replicas[j].evaluations, j))
                self._running[(i, str(ids[i]))] = self._running.get((i, str(ids[i])), 0) + 1
                replica = self.replicas[i]
                replica.in_flight += 1
                replica.most_in_flight = max(replica.most_in_flight, replica.in_flight)
                return i
            await self._event().wait()

    def _release(self, replica: int, session: ServiceSession) -> None:
        key = (replica, str(self._ids(session)[replica]))
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]
        self.replicas[replica].in_flight -= 1
        self._notify()

    def _down(self, replica: int, exc: BaseException) -> None:
        r = self.replicas[replica]
        r.failures += 1
        if r.live and len(self.replicas) > 1:
            _log.warning("replica_down", url=r.url, error=type(exc).__name__)
        r.live = False
        self._notify()

    def _live_holder(self, session: ServiceSession) -> int:
        ids = self._ids(session)
        holders = [i for i, sid in enumerate(ids) if sid is not None and i < len(self.replicas)]
        if not holders:
            raise ConfigError("this session is not open on any replica of this client")
        return next((i for i in holders if self.replicas[i].live), holders[0])

    # -- routes ----------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """`GET /health` of the first replica that answers; remembers the extensions it lists."""
        error: Exception | None = None
        for i, replica in enumerate(self.replicas):
            try:
                data = await self._bodiless("GET", i, "health")
            except (ConnectionFailed, RequestTimeout) as exc:
                self._down(i, exc)
                error = exc
                continue
            replica.live = True
            if not isinstance(data, dict) or data.get("status") != "ok":
                raise BadResponse(f"merge-service health answer is not {{'status': 'ok'}}: {data!r:.120}")
            ext = data.get("extensions")
            self._extensions = tuple(str(e) for e in ext) if isinstance(ext, list) else ()
            self._concurrent = data.get("concurrent_evaluation") == "safe"
            revision = data.get("revision")
            self._revision = revision if isinstance(revision, str) else None
            return data
        assert error is not None
        raise error

    async def extensions(self) -> tuple[str, ...]:
        """The protocol extensions the server offers (empty for a reference-only server)."""
        if self._extensions is None:
            await self.health()
        assert self._extensions is not None
        return self._extensions

    async def presets(self) -> list[ServicePreset]:
        """`GET /v1/presets`: the pools on offer."""
        await self.extensions()
        i = next((j for j, r in enumerate(self.replicas) if r.live), 0)
        data = await self._bodiless("GET", i, "v1", "presets")
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise BadResponse("the presets answer has no items list")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("preset_id"), str):
                raise BadResponse(f"presets.items[{k}] has no preset_id")
            adapters = item.get("adapters")
            datasets = item.get("datasets")
            count = _count(item.get("adapter_count"), f"presets.items[{k}].adapter_count")
            out.append(
                ServicePreset(
                    preset_id=item["preset_id"],
                    adapter_count=count,
                    adapters=tuple(str(a) for a in adapters) if isinstance(adapters, list) else (),
                    datasets=tuple(str(d) for d in datasets) if isinstance(datasets, list) else (),
                    raw=item,
                )
            )
        return out

    def _complete_query_plus(
        self, query_plus: Mapping[str, Any], extensions: tuple[str, ...]
    ) -> dict[str, Any]:
        """What to send: as given to a server with extensions; for a reference-only server, completed
        from `REFERENCE_QUERY_PLUS_DEFAULTS` (it would reset every omitted field to them anyway)."""
        query = dict(query_plus)
        if extensions:
            return query
        if not isinstance(query.get("dataset"), str) or not query["dataset"]:
            raise ConfigError(
                "query_plus needs 'dataset' for this service (a reference-only server requires it); "
                "omit query_plus altogether to use the preset's own"
            )
        unknown = sorted(set(query) - set(REFERENCE_QUERY_PLUS_DEFAULTS) - {"dataset"})
        if unknown:
            raise ConfigError(
                f"query_plus has fields this service does not know and would ignore: {unknown}; it takes "
                f"dataset and {sorted(REFERENCE_QUERY_PLUS_DEFAULTS)}"
            )
        filled = sorted(k for k in REFERENCE_QUERY_PLUS_DEFAULTS if k not in query)
        if filled:
            _log.info(
                "query_plus_completed",
                filled=filled,
                detail="the reference replaces a preset's whole query_plus: omitted fields take its schema "
                "defaults, sent explicitly",
            )
        return {"dataset": query.pop("dataset"), **REFERENCE_QUERY_PLUS_DEFAULTS, **query}

    async def create_session(
        self,
        preset_id: str,
        *,
        query_plus: Mapping[str, Any] | None = None,
        model_name_or_path: str | None = None,
        tokens_per_example: int | None = None,
    ) -> ServiceSession:
        """`POST /v1/sessions` on every replica: a session scoring `query_plus`'s data (the preset's own
        when None). `tokens_per_example` overrides the client's per-example bound for this session."""
        if not isinstance(preset_id, str) or not preset_id:
            raise ConfigError("preset_id must be a non-empty string")
        if tokens_per_example is not None:
            check_number("tokens_per_example", tokens_per_example, integer=True)
        if query_plus is not None and not isinstance(query_plus, Mapping):
            raise ConfigError(f"query_plus must be a mapping (a JSON object), got {query_plus!r:.60}")
        extensions = await self.extensions()
        body: dict[str, Any] = {"preset_id": preset_id}
        if model_name_or_path is not None:
            body["model_name_or_path"] = model_name_or_path
        sent: dict[str, Any] | None = None
        if query_plus is not None:
            sent = body["query_plus"] = self._complete_query_plus(query_plus, extensions)
        try:
            canonical_query = canonical_json(sent, strict=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"query_plus must be JSON-serialisable with finite numbers: {exc}") from None
        answers: list[dict[str, Any] | None] = []
        try:
            for i in range(len(self.replicas)):
                try:
                    answers.append(
                        await self._control(self._url(i, "v1", "sessions"), body, "create_session")
                    )
                except (ConnectionFailed, RequestTimeout) as exc:
                    if len(self.replicas) == 1:
                        raise
                    self._down(i, exc)
                    answers.append(None)
            opened = [a for a in answers if a is not None]
            if not opened:
                raise ConnectionFailed("merge-service: no replica answered the session request")
            ids: list[str | None] = []
            for data in answers:
                sid = data.get("session_id") if data is not None else None
                if data is not None and (not isinstance(sid, str) or not sid):
                    raise BadResponse("the session answer has no session_id")
                ids.append(sid)
            data = opened[0]
            count = _count(data.get("adapter_count"), "session.adapter_count")
            if not count:
                raise BadResponse("the session answer has no adapter_count")
            if any(a.get("adapter_count") != count for a in opened):
                raise BadResponse(
                    "the replicas disagree on the preset's adapter_count: are they one service?"
                )
            n_examples = _count(data.get("n_examples"), "session.n_examples")
            echoed: dict[str, Any] = data["query_plus"] if isinstance(data.get("query_plus"), dict) else {}
            asked = _examples_asked(sent or {}) or _examples_asked(echoed) or n_examples
            if not asked:
                raise BadResponse(
                    "cannot tell how many examples one evaluation of this session scores (the answer has no "
                    "n_examples and no batch_size x evaluation_batches): send query_plus with both"
                )
            per_example = tokens_per_example or self.tokens_per_example
            cutoff = _positive_int((sent or {}).get("cutoff_len"))
            if cutoff is not None:
                per_example = min(per_example, cutoff)  # the server truncates every example to cutoff_len
            revision = data.get("revision") if isinstance(data.get("revision"), str) else self._revision
            fingerprint = cache_key(
                "evomerge/service/session/v1",
                self.cache_namespace,
                preset_id,
                revision or "",
                model_name_or_path or "",
                canonical_query,
            )
            session = ServiceSession(
                session_id=str(next(s for s in ids if s is not None)),
                preset_id=preset_id,
                adapter_count=count,
                query_plus=dict(sent or echoed),
                n_examples=n_examples,
                examples_per_evaluation=asked,
                tokens_per_example=per_example,
                minibatch="minibatch" in extensions and n_examples is not None,
                fingerprint=fingerprint,
                replica_ids=tuple(ids),
                raw=data,
            )
        except BaseException:
            # A replica refused what others accepted, the answers do not add up, or the caller was
            # cancelled: the sessions opened would stay open, counting against a server's cap, since
            # no close reaches them.
            await self._abandon(answers, extensions)
            raise
        self._created.append(session)
        return session

    async def _abandon(self, answers: Sequence[dict[str, Any] | None], extensions: Sequence[str]) -> None:
        """Delete the sessions a failed `create_session` opened on some replicas (where the server can)."""
        if "delete_session" not in extensions:
            return
        for i, data in enumerate(answers):
            sid = data.get("session_id") if data is not None else None
            if isinstance(sid, str) and sid:
                with anyio.move_on_after(10, shield=True):
                    try:
                        await self._bodiless("DELETE", i, "v1", "sessions", sid)
                    except Exception as exc:  # the refusal being raised matters more
                        _log.info("session_not_deleted", session_id=sid, error=type(exc).__name__)

    async def get_session(self, session: ServiceSession) -> dict[str, Any]:
        """`GET /v1/sessions/{id}`: the server's description of the session."""
        _check_session(session)
        i = self._live_holder(session)
        data = await self._bodiless("GET", i, "v1", "sessions", str(self._ids(session)[i]))
        if not isinstance(data, dict):
            raise BadResponse("the session answer is not a JSON object")
        return data

    async def delete_session(self, session: ServiceSession) -> bool:
        """Free a session on the server (an extension); False when the server cannot delete sessions."""
        _check_session(session)
        if "delete_session" not in await self.extensions():
            return False
        await self._delete(session)
        self._created = [s for s in self._created if s is not session]
        return True

    async def _delete(self, session: ServiceSession) -> None:
        for i, sid in enumerate(self._ids(session)):
            if sid is not None and self.replicas[i].live:
                await self._bodiless("DELETE", i, "v1", "sessions", sid)

    def worst_case(self, session: ServiceSession, examples: Sequence[int] | None) -> int:
        """Tokens an evaluation of `examples` (None: all) may cost at most: its budget reservation,
        examples x the per-example bound (for all examples, the count the session asked for, or the
        server's count when its query_plus did not say; see the module doc)."""
        count = session.examples_per_evaluation if examples is None else len(examples)
        return count * session.tokens_per_example

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
        strikes = [0]

        async def send() -> Outcome:
            i = await self._acquire(session)
            try:
                data, limits = await self._post(self._url(i, *self._path(session, i, "evaluate")), body)
            except (ConnectionFailed, RequestTimeout) as exc:
                self._down(i, exc)  # the scheduler retries it, on another replica when there is one
                raise
            except ServerError as err:
                reference = self._reference()
                if reference and session.fingerprint in self._scored and err.status == 500 and strikes[0]:
                    # The reference answers 500 when the loss is NaN/inf: that candidate ranks worst.
                    _log.warning("evaluation_unscorable", session_id=session.session_id, error=str(err))
                    return Outcome({"loss": None}, None, None)
                _strike(err, strikes, "evaluate", reference)
                raise
            finally:
                self._release(i, session)
            self.replicas[i].evaluations += 1
            if "loss" not in data:  # null is "could not score"; absent is a broken answer, never a NaN
                raise BadResponse("answer.loss is missing from the evaluate answer")
            loss = _number(data.get("loss"), "answer.loss", allow_null=True)
            if loss is not None and math.isfinite(loss):
                self._scored.add(session.fingerprint)
            value = {k: v for k, v in data.items() if k not in ("session_id", "tag", "usage")}
            value["loss"] = loss
            # Without usable usage the whole reservation is charged: the budget stays hard.
            return Outcome(value, _answer_usage(data), limits)

        result = await self._call(send, reserve, "evaluate", key)
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

    def _path(self, session: ServiceSession, replica: int, route: str) -> tuple[str, ...]:
        return ("v1", "sessions", str(self._ids(session)[replica]), route)

    async def materialize(
        self, session: ServiceSession, alpha: ArrayLike, beta: ArrayLike, *, tag: str | None = None
    ) -> Materialized:
        """`POST .../materialize`: have the service write the merged adapter; where it went (`path`, or
        the reference's `adapter_dir`)."""
        _check_session(session)
        a, b = _vectors(alpha, beta, session.adapter_count)
        body: dict[str, Any] = {"alpha": a, "beta": b}
        if tag is not None:
            body["tag"] = tag
        i = self._live_holder(session)
        data = await self._control(self._url(i, *self._path(session, i, "materialize")), body, "materialize")
        path = data.get("path", data.get("adapter_dir"))
        if not isinstance(path, str) or not path:
            raise BadResponse("the materialize answer has neither path nor adapter_dir")
        name = data.get("adapter_name")
        return Materialized(path=path, adapter_name=name if isinstance(name, str) else None, raw=data)

    async def optimize(
        self,
        session: ServiceSession,
        *,
        query_plus: Mapping[str, Any] | None = None,
        evaluations: int = 1200,
        request_timeout: float | None = None,
    ) -> Optimization:
        """`POST .../optimize`: the service runs its own search (the reference: pycma, the paper's
        protocol, `evaluations` = 400 + 800 by default) and answers its summary. It is reserved as
        `evaluations` full evaluations and charged in full (the reference reports no usage).
        `request_timeout` bounds this one request (None: none; a real run takes hours)."""
        _check_session(session)
        check_number("evaluations", evaluations, integer=True)
        check_number("request_timeout", request_timeout, allow_none=True, unit="seconds")
        body: dict[str, Any] = {}
        if query_plus is not None:
            if not isinstance(query_plus, Mapping):
                raise ConfigError(f"query_plus must be a mapping (a JSON object), got {query_plus!r:.60}")
            body["query_plus"] = self._complete_query_plus(query_plus, await self.extensions())
        reserve = Usage(evaluations * self.worst_case(session, None), 0)
        i = self._live_holder(session)
        url = self._url(i, *self._path(session, i, "optimize"))
        strikes = [0]

        async def send() -> Outcome:
            try:
                data, limits = await self._post(
                    url, body, math.inf if request_timeout is None else request_timeout
                )
            except ServerError as err:
                _strike(err, strikes, "optimize", self._reference())
                raise
            return Outcome(data, _answer_usage(data), limits)

        result = await self._call(send, reserve, "optimize")
        data = result.value
        best = _number(data.get("best_loss"), "answer.best_loss")
        alpha, beta = data.get("best_alpha"), data.get("best_beta")
        if not isinstance(alpha, list) or not isinstance(beta, list):
            raise BadResponse("the optimize answer has no best_alpha / best_beta lists")
        where = data.get("best_adapter_dir")
        return Optimization(
            best_loss=float(best if best is not None else math.nan),
            alpha=tuple(float(_number(x, "answer.best_alpha[]") or 0.0) for x in alpha),
            beta=tuple(float(_number(x, "answer.best_beta[]") or 0.0) for x in beta),
            adapter_dir=where if isinstance(where, str) else None,
            raw=data,
        )

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
        strikes = [0]

        async def send() -> Outcome:
            i = await self._acquire(session)
            try:
                data, limits = await self._post(self._url(i, *self._path(session, i, "complete")), body)
            except (ConnectionFailed, RequestTimeout) as exc:
                self._down(i, exc)
                raise
            except ServerError as err:
                _strike(err, strikes, "complete", self._reference())
                raise
            finally:
                self._release(i, session)
            value = {k: data.get(k) for k in ("text", "logprobs", "finish_reason")}
            if not isinstance(value["text"], str):
                raise BadResponse("the completion answer has no text")
            return Outcome(value, _answer_usage(data), limits)

        result = await self._call(send, reserve, "complete", key)
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
