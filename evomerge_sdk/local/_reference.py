"""The authors' reference merge service as it really answers, over the embedded repository.

`LocalService(reference_only=True)` serves these routes in place of its own, so the SDK's tests meet what
a client of the authors' service (github Chansl-Lucky/Black-Box-Merging, `BMM_code/`, commit 739c9c8:
FastAPI + PEFT) meets, measured by running it (DESIGN 3):

    GET  /health                          {"status": "ok"}: no extensions, no concurrency claim
    GET  /v1/presets                      {"items": [{"preset_id", "path", "base_model_name_or_path"}]}
    POST /v1/sessions                     {"preset_id", "model_name_or_path"?, "query_plus"?}
                                          -> {"session_id", "preset_id", "workdir", "model_name_or_path",
                                              "query_plus", "adapter_count"}
    GET  /v1/sessions/{id}                the same description
    POST /v1/sessions/{id}/evaluate       {"alpha", "beta", "tag"?} -> {"loss", "adapter_dir"}
    POST /v1/sessions/{id}/materialize    {"alpha", "beta", "tag"?} -> {"adapter_dir", "session"}
    POST /v1/sessions/{id}/optimize       {"query_plus"?} -> its own two-stage search's summary

and as it really fails: a body the schema refuses is FastAPI's 422 `{"detail": [...]}`, an unknown
session 404 `{"detail": "Unknown session."}`, and every exception inside the work (an unknown preset, a
vector of the wrong length, a non-finite loss that JSON cannot carry, an unknown dataset at the first
evaluation) Starlette's bare 500 `Internal Server Error` in text/plain.

Its semantics, kept because a client must survive them:
- a `query_plus` in the request replaces the preset's whole `query_plus`: every field it omits takes the
  schema's default (`REFERENCE_QUERY_PLUS_DEFAULTS`), and `dataset` is required;
- the loss is the mean over `evaluation_batches` batches of `batch_size` examples drawn by a shuffled
  loader that restarts when exhausted (unseeded in the reference; here from `batch_seed`, None being fresh
  entropy), each batch's loss the mean over its examples; so the same vectors can score differently;
- an evaluation writes the merged adapter into the session's folder `artifacts/<tag>` and then loads it
  back from there, so concurrent evaluations of one session with one tag read each other's adapters
  (wrong losses, or a 500 on a half-written file): the reference declares no concurrency safety;
- sessions are never freed.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
from aiohttp import web
from numpy.typing import NDArray

from ..service import REFERENCE_QUERY_PLUS_DEFAULTS
from .backend import ExampleSet, MergeBackend, Preset

__all__ = ["ReferenceFace"]

_T = TypeVar("_T")
Work = Callable[[Callable[[], _T]], Awaitable[_T]]
FloatArray = NDArray[np.float64]

_QUERY_PLUS_TYPES: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "dataset_dir": (str,),
    "template": (str,),
    "cutoff_len": (int,),
    "max_samples": (int, type(None)),
    "batch_size": (int,),
    "evaluation_batches": (int,),
    "temperature": (float, int),
    "top_p": (float, int),
    "top_k": (int,),
    "max_new_tokens": (int,),
    "repetition_penalty": (float, int),
}


class _Unprocessable(Exception):
    """FastAPI's 422: the request body does not fit the pydantic schema."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, value: Any) -> None:
        super().__init__(msg)
        self.detail = [{"type": "value_error", "loc": ["body", *loc], "msg": msg, "input": value}]


@attrs.define(eq=False)
class _Session:
    session_id: str
    preset: Preset
    model_name_or_path: str
    query_plus: dict[str, Any]
    workdir: str  # relative to the service's root, as the reference answers it

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "preset_id": self.preset.preset_id,
            "workdir": self.workdir,
            "model_name_or_path": self.model_name_or_path,
            "query_plus": dict(self.query_plus),
            "adapter_count": len(self.preset.adapters),
        }


def _detail(status: int, detail: Any) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


def _internal_error() -> web.Response:
    # Starlette's answer to any exception a route raises (debug off): no JSON, no message.
    return web.Response(status=500, text="Internal Server Error", content_type="text/plain")


def _typed(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # pydantic (lax) takes a bool for an int, never for a str
        return int in kinds or float in kinds
    return isinstance(value, kinds)


def _query_plus(raw: Any) -> dict[str, Any]:
    """`QueryPlusModel(**raw).model_dump()`: the whole object, omitted fields at their defaults."""
    if not isinstance(raw, dict):
        raise _Unprocessable(("query_plus",), "Input should be a valid dictionary", raw)
    if not isinstance(raw.get("dataset"), str):
        raise _Unprocessable(("query_plus", "dataset"), "Field required", raw)
    out: dict[str, Any] = {"dataset": raw["dataset"], **REFERENCE_QUERY_PLUS_DEFAULTS}
    for key, kinds in _QUERY_PLUS_TYPES.items():
        if key in raw:
            if not _typed(raw[key], kinds):
                raise _Unprocessable(("query_plus", key), f"Input should be {kinds[0].__name__}", raw[key])
            out[key] = raw[key]  # unknown keys are ignored, as pydantic does by default
    return out


def _vector(body: Mapping[str, Any], key: str) -> list[float]:
    value = body.get(key)
    if not isinstance(value, list):
        raise _Unprocessable((key,), "Input should be a valid list", value)
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise _Unprocessable((key, i), "Input should be a valid number", x)
    return [float(x) for x in value]


class ReferenceFace:
    """The reference's routes over a `MergeBackend`: what `LocalService(reference_only=True)` serves.

    `root` is the service's root folder (sessions' work folders live under `root/artifacts/`); `work` runs
    a blocking function in a worker thread; `batch_seed` seeds the loader's shuffles (None: fresh entropy,
    as the unseeded reference).
    """

    def __init__(
        self, backend: MergeBackend, root: Path, work: Work[Any], batch_seed: int | None = None
    ) -> None:
        self.backend = backend
        self.root = root
        self._held: dict[tuple[str, str], tuple[FloatArray, FloatArray]] = {}  # what each folder holds
        self._work = work
        self._rng = np.random.default_rng(batch_seed)
        self.sessions: dict[str, _Session] = {}

    def add_routes(self, app: web.Application) -> None:
        """Install the reference's routes, each answering errors as FastAPI does."""
        r = app.router
        r.add_get("/health", self._guard(self._health))
        r.add_get("/v1/presets", self._guard(self._presets))
        r.add_post("/v1/sessions", self._guard(self._create))
        r.add_get("/v1/sessions/{session_id}", self._guard(self._get))
        r.add_post("/v1/sessions/{session_id}/evaluate", self._guard(self._evaluate))
        r.add_post("/v1/sessions/{session_id}/materialize", self._guard(self._materialize))
        r.add_post("/v1/sessions/{session_id}/optimize", self._guard(self._optimize))

    def _guard(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except _Unprocessable as exc:
                return _detail(422, exc.detail)
            except web.HTTPException:
                raise  # 413 and friends: the server kit answers them
            except Exception:  # the reference lets every other exception become a bare 500
                return _internal_error()

        return run

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            raise _Unprocessable((), "JSON decode error", None) from None
        if not isinstance(body, dict):
            raise _Unprocessable((), "Input should be a valid dictionary", body)
        return body

    def _session(self, request: web.Request) -> _Session | None:
        return self.sessions.get(request.match_info["session_id"])

    def _preset_query_plus(self, preset: Preset) -> dict[str, Any]:
        """A preset file's own query_plus: the defaults, on the preset's default dataset."""
        dataset = preset.default_dataset or (preset.datasets[0] if preset.datasets else "")
        return {"dataset": dataset, **REFERENCE_QUERY_PLUS_DEFAULTS}

    def _examples(self, session: _Session) -> ExampleSet:
        """The session's data, loaded at its first evaluation (a bad name fails there, with a 500)."""
        qp = session.query_plus
        if qp["dataset_dir"] != REFERENCE_QUERY_PLUS_DEFAULTS["dataset_dir"]:
            raise FileNotFoundError(f"no dataset_info.json in {qp['dataset_dir']}")
        examples = self.backend.dataset(session.preset, qp["dataset"])
        if qp["max_samples"] is not None:
            examples = examples.subset(slice(0, max(0, qp["max_samples"])))
        return examples

    def _folder(self, session: _Session, tag: str) -> Path:
        return self.root / session.workdir / "artifacts" / tag

    def _write_adapter(self, session: _Session, alpha: list[float], beta: list[float], tag: str) -> Path:
        """Write the merged adapter into the session's folder for `tag`; from then on that folder holds
        it, whoever asked (the reference loads the folder back to score it)."""
        n = len(session.preset.adapters)
        if len(alpha) != n or len(beta) != n:
            raise ValueError(f"operands could not be broadcast together with shapes ({len(alpha)},) ({n},)")
        folder = self._folder(session, tag)
        folder.mkdir(parents=True, exist_ok=True)
        a, b = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
        self.backend.materialize(session.preset, a, b, folder)
        self._held[(session.session_id, tag)] = (a, b)
        return folder

    def _loss(self, session: _Session, tag: str) -> float:
        """The adapter the tag's folder holds now, scored as the reference does: the mean over
        `evaluation_batches` batches of a shuffled loader (restarted when exhausted) of each batch's loss."""
        alpha, beta = self._held[(session.session_id, tag)]
        qp = session.query_plus
        examples = self._examples(session)
        size = int(qp["batch_size"])
        if size < 1:
            raise ValueError(f"batch_size should be a positive integer value, but got batch_size={size}")
        batches = max(0, int(qp["evaluation_batches"]))
        total, order, at = 0.0, self._rng.permutation(len(examples)), 0
        for _ in range(batches):
            if at >= len(order):  # the loader is exhausted: a fresh shuffle
                order, at = self._rng.permutation(len(examples)), 0
            batch = np.sort(order[at : at + size])  # a batch is a set: its loss does not depend on order
            at += size
            total += self.backend.evaluate(session.preset, alpha, beta, examples.subset(batch)).loss
        return total / max(1, batches)

    def _score(self, session: _Session, alpha: list[float], beta: list[float], tag: str) -> float:
        """Write, then score (the reference's own search runs its evaluations one after another)."""
        self._write_adapter(session, alpha, beta, tag)
        return self._loss(session, tag)

    # -- routes ----------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _presets(self, request: web.Request) -> web.Response:
        items = [
            {
                "preset_id": p.preset_id,
                "path": f"presets/{p.preset_id}.json",
                "base_model_name_or_path": self.backend.base_model,
            }
            for p in self.backend.presets.values()
        ]
        return web.json_response({"items": items})

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        preset_id = body.get("preset_id")
        if not isinstance(preset_id, str):
            raise _Unprocessable(("preset_id",), "Field required", body)
        model = body.get("model_name_or_path")
        if model is not None and not isinstance(model, str):
            raise _Unprocessable(("model_name_or_path",), "Input should be a valid string", model)
        raw = body.get("query_plus")
        query_plus = _query_plus(raw) if raw is not None else None
        preset = self.backend.presets.get(preset_id)
        if preset is None:
            raise FileNotFoundError(f"Unknown preset: {preset_id}")  # a 500, as in the reference
        sid = uuid.uuid4().hex
        session = _Session(
            sid,
            preset,
            model or self.backend.base_model,
            query_plus or self._preset_query_plus(preset),
            f"artifacts/{sid}",
        )
        (self.root / session.workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.sessions[sid] = session
        return web.json_response(session.describe())

    async def _get(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _detail(404, "Unknown session.")
        return web.json_response(session.describe())

    async def _vectors(self, request: web.Request) -> tuple[list[float], list[float], str]:
        body = await self._json(request)
        alpha, beta = _vector(body, "alpha"), _vector(body, "beta")
        tag = body.get("tag", "manual")
        if not isinstance(tag, str):
            raise _Unprocessable(("tag",), "Input should be a valid string", tag)
        return alpha, beta, tag

    async def _evaluate(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _detail(404, "Unknown session.")
        alpha, beta, tag = await self._vectors(request)
        # Two steps, as in the reference: write the adapter into the tag's folder, then load whatever that
        # folder holds and score it. Another evaluation of this session may write in between.
        folder = await self._work(lambda: self._write_adapter(session, alpha, beta, tag))
        loss = await self._work(lambda: self._loss(session, tag))
        if not math.isfinite(loss):
            raise ValueError("Out of range float values are not JSON compliant")
        return web.json_response({"loss": loss, "adapter_dir": str(folder.relative_to(self.root))})

    async def _materialize(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _detail(404, "Unknown session.")
        alpha, beta, tag = await self._vectors(request)
        folder = await self._work(lambda: self._write_adapter(session, alpha, beta, tag))
        return web.json_response(
            {"adapter_dir": str(folder.relative_to(self.root)), "session": session.describe()}
        )

    async def _optimize(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _detail(404, "Unknown session.")
        body = await self._json(request)
        if body.get("query_plus") is not None:
            session.query_plus = _query_plus(body["query_plus"])
        summary = await _optimize(self, session)
        return web.json_response(summary)

    def forget(self) -> None:
        """Drop every session and its folders (the service stopped)."""
        for session in self.sessions.values():
            shutil.rmtree(self.root / session.workdir, ignore_errors=True)
        self.sessions.clear()
        self._held.clear()


async def _optimize(face: ReferenceFace, session: _Session) -> dict[str, Any]:
    """The reference's own search: the paper protocol (stage 1 over alpha at beta 1/N, then stage 2 over
    beta), every evaluation one after another through the session's folders, no early stopping."""
    from ..engine import PAPER, Candidate, EvaluationContext, EvoMerge

    n = len(session.preset.adapters)

    async def objective(candidates: Sequence[Candidate], context: EvaluationContext) -> list[float]:
        tag = "stage1_active" if context.stage == "denoise" else "stage2_active"
        out = []
        for c in candidates:
            out.append(
                await face._work(
                    functools.partial(face._score, session, c.alpha.tolist(), c.beta.tolist(), tag)
                )
            )
        return out

    config = attrs.evolve(PAPER, early_stopping=None, seed=42)
    result = await EvoMerge(objective, n, config).run()
    alpha, beta = result.alpha.tolist(), result.beta.tolist()
    best = await face._work(lambda: face._write_adapter(session, alpha, beta, "final_best"))
    evaluations = {stage.name: stage.evaluations for stage in result.stages}
    return {
        "best_loss": result.fitness,
        "best_alpha": alpha,
        "best_beta": beta,
        "checkpoint_dir": f"{session.workdir}/checkpoints",
        "stage1_evaluations": evaluations.get("denoise", 0),
        "stage2_evaluations": evaluations.get("scale", 0),
        "best_adapter_dir": str(best.relative_to(face.root)),
    }
