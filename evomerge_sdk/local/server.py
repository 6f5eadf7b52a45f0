"""The merge service: the protocol of DESIGN 3 over a `MergeBackend` (default: the embedded repository).

    async with LocalService() as service:          # 127.0.0.1, a free port; builds (or loads) the repository
        print(service.url)                         # http://127.0.0.1:43127

Reference routes:

    GET  /health                           {"status": "ok", "extensions": [...], ...}
    GET  /v1/presets                       {"items": [{"preset_id", "adapter_count", "adapters", "datasets"}]}
    POST /v1/sessions                      {"preset_id", "model_name_or_path"?, "query_plus"?} -> session
    GET  /v1/sessions/{id}                 the session's description
    POST /v1/sessions/{id}/evaluate        {"alpha": [N], "beta": [N], "tag"?} -> {"loss", ...}
    POST /v1/sessions/{id}/materialize     {"alpha", "beta", "tag"?} -> {"path", "adapter_name", ...}

`reference_only=True` serves instead the authors' service exactly as it really answers (field names,
500s, random batches and unsafe concurrency included: `local._reference`), so clients are tested against
what they will meet.

Extensions (listed by `GET /health` under "extensions"): `usage` on every billable answer; metrics
(accuracy, macro-F1) beside the loss; inline validation data (`query_plus.examples`); minibatch scoring
(`"examples": [indices]` on evaluate); `POST /v1/sessions/{id}/complete`; `DELETE /v1/sessions/{id}`;
the OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models` over the base, every adapter and
every materialized merge; `GET /stats` (what was served). `/health` also says
`"concurrent_evaluation": "safe"`: evaluations of one session may run at once and get exactly their serial
answers. Optional bearer-token auth guards `/v1/`.

Errors are JSON `{"error": {"message", "type", "code"}}`: 400 unreadable JSON (and any malformed chat
request, as OpenAI answers), 401 bad or missing token, 404 unknown session, preset, model or route, 413
body over `max_body_bytes`, 422 malformed vectors or fields (wrong length, NaN/inf, non-numbers, alpha
outside [0, 1]), 429 + `Retry-After` over the configured RPM/TPM, 503 + `Retry-After` when `max_sessions`
sessions are open (a capacity limit of this process, not a rate limit: it clears when an idle session
expires after `session_ttl` seconds or a client deletes one). A refused request changes nothing.

Status mapping: request checks (`local.sessions`) and backends (`local.backend`) raise domain errors;
this module alone turns them into statuses (`NotFound` 404, `InvalidField` 422, `MalformedRequest` 400),
so a second backend (`evomerge-peft`) gets the same routes, validation, auth, caps and errors unchanged.

RPM/TPM limits and fault injection (error rate, latency, dropped connections, ...) come from
`evomerge_sdk.local.faults` and apply to the billable routes (`/v1/sessions/...`, `/v1/chat/...`); TPM
counts the tokens a request will process. Numpy work runs in worker threads, so the server stays
responsive, and every answer is a pure function of its request.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs
from aiohttp import web

from .._checks import check_number
from .._io import canonical_json, remove_stale_temps
from .._logs import get_logger
from ..errors import ConfigError, StorageError, UsageError
from ..http.server import AppServer, Handler, Refusal, check_api_key, is_loopback, until_terminated
from ..http.wire import chat_logprobs, chat_usage, loads
from ._reference import ReferenceFace
from .backend import (
    Decoding,
    Generation,
    InvalidField,
    MalformedRequest,
    MergeBackend,
    NotFound,
    ServiceRequestError,
)
from .faults import FaultConfig, FaultInjector, ServerLimits, ServerStats, record_served
from .repository import Repository, RepositoryConfig, build_repository
from .repository_backend import RepositoryBackend
from .sessions import (
    EXTENSIONS,
    Session,
    describe_preset,
    integer_field,
    parse_decoding,
    parse_examples_indices,
    parse_session_request,
    parse_top_logprobs,
    parse_vectors,
    prompt_of_messages,
    request_seed,
    tag_of,
    usage,
)

__all__ = ["LocalService", "serve"]

_log = get_logger("evomerge_sdk.local.server")
_T = TypeVar("_T")

# The parsed body of the request being handled (parsed once: TPM costing and the handler share it).
_parsed: contextvars.ContextVar[tuple[web.Request, Any] | None] = contextvars.ContextVar(
    "evomerge_local_parsed", default=None
)
_BILLABLE = ("/v1/sessions/", "/v1/chat/")
_EVALUATE_FIELDS = {"alpha", "beta", "tag", "examples"}
_MATERIALIZE_FIELDS = {"alpha", "beta", "tag"}


_STATUS: tuple[tuple[type[ServiceRequestError], int], ...] = (
    (NotFound, 404),
    (InvalidField, 422),
    (MalformedRequest, 400),
)


def _refusal(exc: ServiceRequestError) -> Refusal:
    """The HTTP answer of a domain error (422 for any other kind: a request the service cannot use)."""
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 422)
    return Refusal(status, exc.message, exc.kind)


def _logprobs(generation: Generation) -> list[dict[str, Any]]:
    """A generation's tokens as the `/complete` route's `logprobs` list."""
    return [
        {
            "token": g.token,
            "logprob": g.logprob,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in g.top_logprobs],
        }
        for g in generation.tokens
    ]


def _json(data: Any, status: int = 200) -> web.Response:
    # Strict JSON: a non-finite number never leaves this server (the work maps them to null).
    return web.Response(
        text=json.dumps(data, allow_nan=False, separators=(",", ":")),
        status=status,
        content_type="application/json",
    )


@attrs.define
class _Open:
    session: Session
    last_used: float
    materialized: dict[str, int] = attrs.field(factory=dict)  # path -> bytes, for the per-session cap


class LocalService(AppServer):
    """The merge service as an async context manager (127.0.0.1 and a free port by default).

    `backend` is what it serves; without one, the embedded repository: `repository` (or
    `repository_config`, default the 110-adapter hub, cached on disk), whose presets `pool_sizes` and
    `pool_seed` make (`RepositoryBackend`). `api_key` turns on bearer-token auth;
    `limits` and `faults` are the RPM/TPM enforcement and fault injection of `local.faults`.
    `output_dir` receives materialized merges (default: a fresh temporary folder; temp files that killed
    writes left there are removed at start). Each session may materialize at most
    `max_materialized_files` merges and `max_materialized_bytes` in all: past either, materialize
    is refused (409, nothing written; files already written stay, since clients hold their paths). A
    disk that cannot take the file is a 507 naming the path. `reference_only`
    answers exactly as the authors' service does (`local._reference`), to test clients against it;
    `batch_seed` seeds its shuffled batches (None: fresh entropy, as the reference).
    A non-loopback `host` needs an `api_key`.
    """

    _routes_hint = ": see GET /health and GET /v1/presets"

    def __init__(
        self,
        repository: Repository | None = None,
        *,
        repository_config: RepositoryConfig | None = None,
        backend: MergeBackend | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        limits: ServerLimits | None = None,
        faults: FaultConfig | None = None,
        pool_sizes: Sequence[int] = (5, 20, 100),
        pool_seed: int = 0,
        max_sessions: int = 64,
        session_ttl: float = 3600.0,
        max_body_bytes: int = 1 << 20,
        max_inline_examples: int = 2000,
        workers: int = 2,
        output_dir: str | Path | None = None,
        max_materialized_files: int = 32,
        max_materialized_bytes: int = 256 << 20,
        reference_only: bool = False,
        batch_seed: int | None = None,
    ) -> None:
        if repository is not None and not isinstance(repository, Repository):
            raise ConfigError(f"repository must be a Repository, got {type(repository).__name__}")
        if repository_config is not None and not isinstance(repository_config, RepositoryConfig):
            raise ConfigError(f"repository_config must be a RepositoryConfig, got {repository_config!r:.60}")
        if backend is not None and not isinstance(backend, MergeBackend):
            raise ConfigError(f"backend must be a MergeBackend, got {type(backend).__name__}")
        if backend is not None and (repository is not None or repository_config is not None):
            raise ConfigError("give a backend or a repository (or its config), not both")
        key = check_api_key(api_key)  # before anything else, so no later message can hold it
        if not isinstance(host, str) or not host:
            raise ConfigError(f"host must be a host name or address, got {host!r:.60}")
        if not is_loopback(host) and api_key is None:
            raise ConfigError(f"listening on {host!r} (not loopback) needs an api_key")
        if isinstance(pool_sizes, (str, bytes)) or not isinstance(pool_sizes, Sequence) or not pool_sizes:
            raise ConfigError(
                f"pool_sizes must be a non-empty list of positive integers, got {pool_sizes!r:.60}"
            )
        for size in pool_sizes:
            check_number("pool_sizes entries", size, integer=True)
        check_number("pool_seed", pool_seed, integer=True, strict=False)
        check_number("batch_seed", batch_seed, integer=True, strict=False, allow_none=True)
        if limits is not None and not isinstance(limits, ServerLimits):
            raise ConfigError(f"limits must be a ServerLimits or None, got {limits!r:.60}")
        if faults is not None and not isinstance(faults, FaultConfig):
            raise ConfigError(f"faults must be a FaultConfig or None, got {faults!r:.60}")
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError(f"output_dir must be a path, got {output_dir!r:.60}")
        for name, value in (
            ("max_sessions", max_sessions),
            ("max_body_bytes", max_body_bytes),
            ("max_inline_examples", max_inline_examples),
            ("workers", workers),
            ("max_materialized_files", max_materialized_files),
            ("max_materialized_bytes", max_materialized_bytes),
        ):
            check_number(name, value, integer=True)
        check_number("session_ttl", session_ttl, unit="seconds")
        check_number("port", port, integer=True, strict=False)
        if port > 65535:
            raise ConfigError(f"port must be in [0, 65535], got {port}")
        self.host, self.port = host, port
        self._repository = repository
        self._repository_config = repository_config
        self.backend: MergeBackend | None = backend
        self._api_key = key
        self.pool_sizes = tuple(int(s) for s in pool_sizes)
        self.pool_seed = int(pool_seed)
        self.max_sessions = max_sessions
        self.session_ttl = float(session_ttl)
        self.max_body_bytes = max_body_bytes
        self.max_inline_examples = max_inline_examples
        self.reference_only = bool(reference_only)
        self.batch_seed = batch_seed
        self._reference: ReferenceFace | None = None
        self.extensions = () if reference_only else EXTENSIONS
        self._output_dir = Path(output_dir) if output_dir is not None else None
        self.max_materialized_files = max_materialized_files
        self.max_materialized_bytes = max_materialized_bytes
        if self._output_dir is not None and self._output_dir.exists() and not self._output_dir.is_dir():
            raise ConfigError(f"output_dir {str(self._output_dir)!r} is a file, not a folder")
        self._workers = anyio.CapacityLimiter(workers)
        self.stats = ServerStats()
        self.injector = FaultInjector(
            faults, limits, stats=self.stats, token_cost=self._token_cost, paths=_BILLABLE
        )
        self._sessions: dict[str, _Open] = {}

    def __repr__(self) -> str:  # never the key
        auth = self._api_key is not None
        return f"LocalService(url={self.url!r}, auth={auth}, reference_only={self.reference_only})"

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def repository(self) -> Repository:
        """The embedded repository served (available once started, when it is the backend)."""
        backend = self._backend()
        if not isinstance(backend, RepositoryBackend):
            raise UsageError(f"this service serves a {type(backend).__name__}, not the embedded repository")
        return backend.repository

    @property
    def open_sessions(self) -> int:
        """Sessions currently open."""
        if self._reference is not None:
            return len(self._reference.sessions)
        return len(self._sessions)

    @property
    def output_dir(self) -> Path | None:
        """Where materialized merges go (with `reference_only`, the root of the sessions' folders)."""
        return self._output_dir

    async def __aenter__(self) -> LocalService:
        if self._output_dir is not None and self._output_dir.is_dir():
            # This service owns its output folder: debris of writes killed in an earlier run goes now.
            removed = remove_stale_temps(self._output_dir, older_than=0.0)
            if removed:
                _log.info("stale_temp_files_removed", folder=str(self._output_dir), files=removed)
        if self.backend is None:
            repo = self._repository
            if repo is None:
                repo = await anyio.to_thread.run_sync(build_repository, self._repository_config)
            self.backend = await anyio.to_thread.run_sync(
                RepositoryBackend, repo, self.pool_sizes, self.pool_seed
            )
        app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[self._front, self.injector.middleware]
        )
        if self.reference_only:
            if self._output_dir is None:
                self._output_dir = Path(tempfile.mkdtemp(prefix="evomerge-reference-"))
            self._reference = ReferenceFace(self._backend(), self._output_dir, self._work, self.batch_seed)
            self._reference.add_routes(app)
        else:
            self._add_routes(app)
        await self._serve(app)
        _log.info("local_service_started", url=self.url, presets=len(self.backend.presets))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()
        self._sessions.clear()
        if self._reference is not None:
            self._reference.forget()
            self._reference = None

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/health", self._wrap(self._health))
        r.add_get("/v1/presets", self._wrap(self._presets))
        r.add_post("/v1/sessions", self._wrap(self._create_session))
        r.add_get("/v1/sessions/{session_id}", self._wrap(self._get_session))
        r.add_post("/v1/sessions/{session_id}/evaluate", self._wrap(self._evaluate))
        r.add_post("/v1/sessions/{session_id}/materialize", self._wrap(self._materialize))
        r.add_delete("/v1/sessions/{session_id}", self._wrap(self._delete_session))
        r.add_post("/v1/sessions/{session_id}/complete", self._wrap(self._complete))
        r.add_post("/v1/chat/completions", self._wrap(self._chat))
        r.add_get("/v1/models", self._wrap(self._models))
        r.add_get("/stats", self._wrap(self._stats))

    # -- plumbing --------------------------------------------------------------------------------
    def _wrap(self, handler: Handler) -> Handler:
        """Domain errors become refusals, and refusals JSON answers, inside the fault middleware, so its
        statistics see them."""

        async def mapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ServiceRequestError as exc:
                raise _refusal(exc) from None

        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            return await self._respond(request, mapped)

        return run

    async def _body(self, request: web.Request) -> dict[str, Any]:
        cached = _parsed.get()
        if cached is not None and cached[0] is request:
            body = cached[1]
        else:
            raw = await request.read()  # 413 past client_max_size
            try:
                body = loads(raw) if raw else None
            except ValueError as exc:  # not UTF-8, not JSON, or nested too deeply (NestingError)
                body = exc
            _parsed.set((request, body))
        if isinstance(body, Exception):
            raise Refusal(400, f"the body is not valid JSON: {body}", "invalid_json")
        if not isinstance(body, dict):
            raise Refusal(422, "the body must be a JSON object")
        return body

    async def _work(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._workers)

    def _backend(self) -> MergeBackend:
        if self.backend is None:
            raise UsageError("the service has not started: `async with LocalService(...) as service:`")
        return self.backend

    def _session(self, request: web.Request) -> Session:
        sid = request.match_info["session_id"]
        entry = self._sessions.get(sid)
        now = time.monotonic()
        if entry is None or now - entry.last_used > self.session_ttl:
            raise NotFound(f"unknown session {sid!r} (never created, deleted or expired)")
        return entry.session

    def _touch(self, session: Session) -> None:
        entry = self._sessions.get(session.session_id)
        if entry is not None:
            entry.last_used = time.monotonic()

    @staticmethod
    def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidField(f"unknown fields {unknown}; this route takes {sorted(allowed)}")

    async def _token_cost(self, request: web.Request) -> int:
        """Tokens a billable request will process (its TPM cost); 0 when it will be refused anyway."""
        try:
            body = await self._body(request)
            if request.path.startswith("/v1/chat/"):
                prompt = prompt_of_messages(body.get("messages"))
                return self._backend().prompt_tokens(prompt) + 1
            session = self._session(request)
            if request.path.endswith("/evaluate"):
                idx = parse_examples_indices(body.get("examples"), session.n_examples)
                return int(session.tokens.sum() if idx is None else session.tokens[idx].sum())
            if request.path.endswith("/complete"):
                given = body.get("prompt")
                text = given if isinstance(given, str) else prompt_of_messages(body.get("messages"))
                return self._backend().prompt_tokens(text) + 1
        except (Refusal, ServiceRequestError, web.HTTPException, TypeError, ValueError):
            return 0
        return 0

    # -- reference routes ------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return _json(
            {
                "status": "ok",
                "service": "evomerge-sdk embedded merge service",
                "extensions": list(self.extensions),
                "revision": self._backend().revision,
                "auth": self._api_key is not None,
                # The backend contract: every answer is a pure function of its request, whatever runs beside
                # it, so clients may evaluate one session's candidates concurrently (DESIGN 3).
                "concurrent_evaluation": "safe",
            }
        )

    async def _presets(self, request: web.Request) -> web.Response:
        backend = self._backend()
        return _json(
            {"items": [describe_preset(backend, p, extensions=True) for p in backend.presets.values()]}
        )

    def _expire(self, now: float) -> None:
        stale = [sid for sid, e in self._sessions.items() if now - e.last_used > self.session_ttl]
        for sid in stale:
            del self._sessions[sid]

    async def _create_session(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_fields(body, {"preset_id", "model_name_or_path", "query_plus"})
        sid = "sess_" + secrets.token_hex(12)
        session = parse_session_request(
            self._backend(),
            body,
            sid,
            max_inline_examples=self.max_inline_examples,
            extensions=True,
        )
        now = time.monotonic()
        self._expire(now)
        if len(self._sessions) >= self.max_sessions:
            oldest = min(e.last_used for e in self._sessions.values())
            wait = max(1, math.ceil(oldest + self.session_ttl - now))
            raise Refusal(
                503,
                f"this service holds at most {self.max_sessions} open sessions; delete one "
                f"(DELETE /v1/sessions/{{id}}) or retry after an idle one expires ({wait} s)",
                "session_limit",
                {"Retry-After": str(wait)},
            )
        self._sessions[sid] = _Open(session, now)
        _log.debug(
            "session_created", session_id=sid, preset_id=session.preset.preset_id, n=session.n_examples
        )
        return _json({**session.describe(extensions=True), "revision": self._backend().revision})

    async def _get_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        return _json({**session.describe(extensions=True), "revision": self._backend().revision})

    async def _evaluate(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await self._body(request)
        self._check_fields(body, _EVALUATE_FIELDS)
        alpha, beta = parse_vectors(body, len(session.preset.adapters))
        tag = tag_of(body)
        idx = parse_examples_indices(body.get("examples"), session.n_examples)
        self._touch(session)
        examples = session.examples if idx is None else session.examples.subset(idx)
        ev = await self._work(self._backend().evaluate, session.preset, alpha, beta, examples)
        record_served(request, ev.input_tokens, 0)
        loss = ev.loss if math.isfinite(ev.loss) else None
        result = {"loss": loss, **ev.metrics, "n_examples": ev.n_examples, "usage": usage(ev.input_tokens, 0)}
        return _json({**result, "tag": tag, "session_id": session.session_id})

    async def _materialize(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await self._body(request)
        self._check_fields(body, _MATERIALIZE_FIELDS)
        alpha, beta = parse_vectors(body, len(session.preset.adapters))
        tag = tag_of(body)
        self._touch(session)
        entry = self._sessions[session.session_id]
        self._check_materialize_quota(entry)
        if self._output_dir is None:
            self._output_dir = Path(tempfile.mkdtemp(prefix="evomerge-materialized-"))
        try:
            result = await self._work(
                self._backend().materialize, session.preset, alpha, beta, self._output_dir
            )
        except StorageError as exc:  # the disk, not the request: 507, naming the path
            raise Refusal(507, str(exc), "insufficient_storage") from None
        entry.materialized[str(result["path"])] = int(result.get("bytes") or 0)
        record_served(request, 0, 0)
        return _json({**result, "tag": tag, "usage": usage(0, 0)})

    def _check_materialize_quota(self, entry: _Open) -> None:
        """Refuse (409) a materialize that would pass the session's cap; a merge of a pool is always the
        same size, so the last one's size says what the next will cost."""
        done = entry.materialized
        files, total = len(done), sum(done.values())
        next_size = next(reversed(done.values()), 0)
        if files >= self.max_materialized_files or total + next_size > self.max_materialized_bytes:
            raise Refusal(
                409,
                f"this session has materialized {files} merges ({total} bytes); the cap is "
                f"{self.max_materialized_files} merges and {self.max_materialized_bytes} bytes per session: "
                "reuse a path already returned, or open a new session",
                "materialize_limit",
            )

    # -- extensions ------------------------------------------------------------------------------
    async def _delete_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        del self._sessions[session.session_id]
        return _json({"session_id": session.session_id, "deleted": True})

    async def _complete(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await self._body(request)
        self._check_fields(
            body,
            {"alpha", "beta", "prompt", "messages", "max_tokens", "top_logprobs", "temperature", "top_p",
             "top_k", "seed", "tag"},
        )  # fmt: skip
        alpha, beta = parse_vectors(body, len(session.preset.adapters))
        if isinstance(body.get("prompt"), str):
            prompt = body["prompt"]
        elif body.get("prompt") is None and body.get("messages") is not None:
            try:
                prompt = prompt_of_messages(body["messages"])
            except MalformedRequest as exc:
                raise InvalidField(exc.message) from None
        else:
            raise InvalidField("give prompt (a string) or messages (a chat)")
        integer_field(body, "max_tokens", None, low=1)
        decoding = parse_decoding(body, session.decoding)
        top = parse_top_logprobs(body)
        seed = request_seed(body)
        self._touch(session)

        out = await self._work(
            self._backend().complete, session.preset, alpha, beta, prompt, decoding, top, seed
        )
        record_served(request, out.prompt_tokens, len(out.tokens))
        return _json(
            {
                "text": out.text,
                "finish_reason": "stop",
                "logprobs": _logprobs(out),
                "usage": usage(out.prompt_tokens, len(out.tokens)),
                "tag": tag_of(body),
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            return await self._chat_answer(request)
        except InvalidField as exc:  # OpenAI answers malformed requests with 400
            raise MalformedRequest(exc.message, exc.kind) from None
        except Refusal as exc:
            if exc.status == 422:
                raise Refusal(400, exc.message, exc.kind) from None
            raise

    async def _chat_answer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("stream"):
            raise Refusal(400, "stream=true is not supported: this service returns whole completions")
        if body.get("n", 1) != 1:
            raise Refusal(400, "n must be 1")
        backend = self._backend()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise MalformedRequest("model must be a non-empty string")
        if model not in backend.chat_models():
            raise NotFound(
                f"The model {model!r} does not exist: use {backend.base_model!r} or an adapter name",
                "model_not_found",
            )
        prompt = prompt_of_messages(body.get("messages"))
        integer_field(body, "max_tokens", None, low=1)
        integer_field(body, "max_completion_tokens", None, low=1)
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise Refusal(400, "logprobs must be true or false")
        top = parse_top_logprobs(body)
        if top and not logprobs:
            raise Refusal(400, "top_logprobs needs logprobs=true")
        decoding = parse_decoding({k: body.get(k) for k in ("temperature", "top_p")}, Decoding())
        seed = request_seed(body)
        out = await self._work(backend.chat, model, prompt, decoding, top, seed)
        prompt_tokens, completion_tokens = out.prompt_tokens, len(out.tokens)
        record_served(request, prompt_tokens, completion_tokens)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if logprobs:
            choice["logprobs"] = {
                "content": chat_logprobs((g.token, g.logprob, g.top_logprobs) for g in out.tokens)
            }
        digest = hashlib.sha256(canonical_json(body).encode()).hexdigest()[:24]
        return _json(
            {
                "id": f"chatcmpl-{digest}",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "system_fingerprint": f"evomerge-local-{backend.revision}",
                "choices": [choice],
                "usage": chat_usage(prompt_tokens, completion_tokens),
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        names = self._backend().chat_models()
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "evomerge-local"} for n in names
                ],
            }
        )

    async def _stats(self, request: web.Request) -> web.Response:
        return _json({**self.stats.as_dict(), "open_sessions": self.open_sessions})


async def serve(service: LocalService, *, announce: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run `service` until SIGINT/SIGTERM; `announce` receives {"url", "presets", ...} once it listens."""
    async with service:
        backend = service._backend()
        info = {
            "url": service.url,
            "presets": len(backend.presets),
            "adapters": len({name for preset in backend.presets.values() for name in preset.adapters}),
            "auth": service._api_key is not None,
            "reference_only": service.reference_only,
        }
        if announce is not None:
            announce(info)
        await until_terminated()
