"""Bad input everywhere gets a clear error naming the problem, at the boundary: configs, vectors,
validation data, provider answers, CLI arguments. Nothing crashes from deep inside, and a failing run
leaves its checkpoint and cache as they were."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import numpy as np
import pytest
import structlog
from _resume_driver import SEARCH, run_search
from aiohttp import web
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider

from evomerge_sdk.cli import main as cli_main
from evomerge_sdk.demo import DemoConfig, OutputDemoConfig, load_result
from evomerge_sdk.engine import (
    Candidate,
    EvaluationContext,
    EvoMerge,
    SearchConfig,
    Split,
    StageConfig,
    ablations,
    fit_to_queries,
    preset,
    random_search,
    task_arithmetic,
)
from evomerge_sdk.errors import BadResponse, ConfigError, EvomergeError, InvalidRequest, StorageError
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.faults import FaultConfig, ServerLimits
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.merged import MERGED_FORMAT, MergedModel, MergedSpec, load_spec
from evomerge_sdk.objectives import (
    AnswerSet,
    LabelledExamples,
    OutputSpaceObjective,
    ScoringConfig,
    ServiceObjective,
    collect_scores,
)
from evomerge_sdk.providers import ChatRequest, Usage, load_provider
from evomerge_sdk.scheduler import Budget, ResponseCache, RetryPolicy, Scheduler
from evomerge_sdk.service import MergeServiceClient

PRESET = preset_id("ood:ner/news", 5)
ONCE = RetryPolicy(max_attempts=1)


def _clear(message: str) -> None:
    """One readable line: no traceback, no wall of text."""
    assert "\n" not in message.strip() and "Traceback" not in message and len(message) < 400, message


# -- configs ---------------------------------------------------------------------------------------
def _stage(**changes: Any) -> StageConfig:
    settings: dict[str, Any] = {"start": 1.0, "sigma": 0.1, "lower": 0.0, "upper": 1.0, "max_evaluations": 10}
    return StageConfig(**(settings | changes))


CONFIGS: dict[str, tuple[Callable[[], object], str]] = {
    "concurrency 0": (lambda: Scheduler(max_concurrency=0), "max_concurrency"),
    "timeout NaN": (lambda: Scheduler(timeout=math.nan), "timeout"),
    "budget negative": (lambda: Budget(tokens=-5), "Budget.tokens"),
    "budget empty": (lambda: Budget(), "tokens=..., usd=..."),
    "budget a string": (lambda: Scheduler(budget="1000"), "budget must be a Budget"),  # type: ignore[arg-type]
    "usd budget unpriced": (lambda: Scheduler(budget=Budget(usd=1.0), models=["my-model"]), "no price"),
    "retry attempts 0": (lambda: RetryPolicy(max_attempts=0), "max_attempts"),
    "retry delay negative": (lambda: RetryPolicy(base_delay=-1.0), "base_delay"),
    "cache a number": (lambda: Scheduler(cache=3), "cache must be"),  # type: ignore[arg-type]
    "cache a folder": (lambda: ResponseCache("."), "is a directory"),
    "fault rate > 1": (lambda: FaultConfig(error_rate=1.5), "probability"),
    "fault rates sum > 1": (lambda: FaultConfig(error_rate=0.6, drop_rate=0.6), "sum to"),
    "server rpm negative": (lambda: ServerLimits(rpm=-1), "ServerLimits.rpm"),
    "stage sigma 0": (
        lambda: StageConfig(start=1.0, sigma=0.0, lower=0, upper=1, max_evaluations=10),
        "sigma",
    ),
    "stage bounds": (
        lambda: StageConfig(start=1.0, sigma=0.1, lower=1, upper=0, max_evaluations=10),
        "lower",
    ),
    "stage start NaN": (
        lambda: _stage(start=math.nan),
        "start",
    ),
    "message without content": (
        lambda: ChatRequest(model="m", messages=[{"role": "user"}]),
        "message 0 must be a Message or a mapping",
    ),
    "stage popsize a string": (lambda: _stage(popsize="20"), "popsize"),
    "stage popsize fractional": (lambda: _stage(popsize=2.5), "popsize"),
    "stage from a dict with a stray key": (
        lambda: StageConfig.from_dict(
            {"start": 1.0, "sigma": 0.1, "lower": 0, "upper": 1, "max_evaluations": 10, "x": 1}
        ),
        "unexpected keyword argument 'x'",
    ),
    "search config without a name": (lambda: SearchConfig.from_dict({}), "needs a name"),
    "stage start None": (lambda: _stage(start=None), "start must be a finite number"),
    "stage given as text": (
        lambda: SearchConfig(name="x", denoise="fast", scale=None),
        "denoise must be a StageConfig",
    ),  # type: ignore[arg-type]
    "early stopping a number": (lambda: attrs.evolve(SEARCH, early_stopping=5), "early_stopping must be"),
    "preset a list": (lambda: preset(["default"]), "unknown preset"),  # type: ignore[arg-type]
    "candidate of words": (lambda: Candidate(["a", "b"], [1, 1]), "must be numbers"),
    "objective without a session": (
        lambda: ServiceObjective(MergeServiceClient("http://127.0.0.1:1"), None),  # type: ignore[arg-type]
        "validation session must be a ServiceSession",
    ),
    "prices a list": (lambda: Scheduler(prices=[1, 2]), "prices must map model names"),  # type: ignore[arg-type]
    "models a number": (lambda: Scheduler(models=5), "models must be a list"),  # type: ignore[arg-type]
    "per-model limits as text": (lambda: Scheduler(limits_per_model="no"), "limits_per_model"),  # type: ignore[arg-type]
    "call without a function": (
        lambda: anyio.run(lambda: Scheduler().call(None, model="m", reserve=Usage(1, 1))),  # type: ignore[arg-type]
        "fn must be an async function",
    ),
    "call without a model": (
        lambda: anyio.run(lambda: Scheduler().call(lambda: None, model=5, reserve=Usage(1, 1))),  # type: ignore[arg-type]
        "model must be a non-empty string",
    ),
    "evaluate without a session": (
        lambda: anyio.run(lambda: MergeServiceClient("http://127.0.0.1:1").evaluate("s1", [1.0], [1.0])),  # type: ignore[arg-type]
        "session must be a ServiceSession",
    ),
    "answer set of nothing": (lambda: AnswerSet(None), "options must be a sequence"),  # type: ignore[arg-type]
    "gold answer a number": (
        lambda: LabelledExamples.of(["p"], [5], ["a", "b"]),
        "gold answer must be a string",
    ),  # type: ignore[list-item]
    "scoring with a stray key": (
        lambda: ScoringConfig.from_dict({"bogus": 1}),
        "unexpected keyword argument",
    ),
    "scoring seed text": (lambda: ScoringConfig(seed="x"), "seed must be an integer"),  # type: ignore[arg-type]
    "merged answer set one string": (
        lambda: MergedSpec.from_dict(
            {
                "format": MERGED_FORMAT,
                "version": 1,
                "mode": "output",
                "pool": ["a"],
                "alpha": [1],
                "beta": [1],
                "answer_set": "xy",
            }
        ),
        "expected a list of names",
    ),
    "merged model with a text provider": (
        lambda: MergedModel(
            MergedSpec("output", ["a"], [1.0], [1.0], answer_set=("x", "y")), provider="openai"
        ),  # type: ignore[arg-type]
        "provider must be a Provider",
    ),
    "service pool sizes a number": (
        lambda: LocalService(pool_sizes=5),
        "pool_sizes must be a non-empty list",
    ),  # type: ignore[arg-type]
    "service pool seed negative": (lambda: LocalService(pool_seed=-1), "pool_seed"),
    "service faults as text": (lambda: LocalService(faults="drop"), "faults must be a FaultConfig"),  # type: ignore[arg-type]
    "minibatch of 0": (lambda: EvaluationContext(Split.VALIDATION, "s", 0, 0, batch_size=0), "batch_size"),
    "scores without a scheduler": (
        lambda: anyio.run(
            lambda: collect_scores(None, {}, ["m"], LabelledExamples.of(["p"], ["a"], ["a", "b"]))
        ),  # type: ignore[arg-type]
        "scheduler must be a Scheduler",
    ),
    "scores from a text provider": (
        lambda: anyio.run(
            lambda: collect_scores(
                Scheduler(), "openai", ["m"], LabelledExamples.of(["p"], ["a"], ["a", "b"])
            )  # type: ignore[arg-type]
        ),
        "not a Provider",
    ),
    "objective not async": (
        lambda: anyio.run(EvoMerge(lambda c, x: [0.0] * len(c), 5, SEARCH).run),  # type: ignore[arg-type, return-value]
        "the objective must be async",
    ),
    "checkpoint a number": (
        lambda: EvoMerge(lambda c, x: [], 5, SEARCH, checkpoint=5),
        "checkpoint must be a file path",
    ),  # type: ignore[arg-type]
    "task arithmetic words": (
        lambda: anyio.run(lambda: task_arithmetic(lambda c, x: [], 5, lambdas=["x"])),  # type: ignore[arg-type, list-item]
        "lambdas must be a list of numbers",
    ),
    "random search half a box": (
        lambda: anyio.run(lambda: random_search(lambda c, x: [], 5, alpha_bounds=(0,))),  # type: ignore[arg-type]
        "alpha_bounds must be a",
    ),
    "random search alpha past 1": (
        lambda: anyio.run(lambda: random_search(lambda c, x: [], 5, alpha_bounds=(0, 5))),  # type: ignore[arg-type]
        "within \\[0, 1\\]",
    ),
    "spec from nothing": (lambda: load_spec(None), "needs a file path"),  # type: ignore[arg-type]
    "service host a number": (lambda: LocalService(host=5), "host must be"),  # type: ignore[arg-type]
    "demo preset a list": (lambda: DemoConfig(preset=["default"]), "unknown preset"),  # type: ignore[arg-type]
    "headers a number": (
        lambda: OpenAIProvider(base_url="http://127.0.0.1:1/v1", headers=5),
        "headers must be a mapping",
    ),  # type: ignore[arg-type]
    "header value a number": (
        lambda: AnthropicProvider(base_url="http://127.0.0.1:1", api_key="k", headers={"X-Team": 5}),  # type: ignore[dict-item]
        "must name a string value",
    ),
    "provider argument unknown": (lambda: load_provider("openai", bogus=1), "provider 'openai'.*bogus"),
    "complete without a provider": (
        lambda: anyio.run(lambda: Scheduler().complete(None, ChatRequest(model="m", messages="x"))),  # type: ignore[arg-type]
        "provider must be a Provider",
    ),
    "reserve of text": (
        lambda: anyio.run(lambda: Scheduler().call(lambda: None, model="m", reserve=Usage("1", 0))),  # type: ignore[arg-type]
        "reserve must be a Usage",
    ),
    "ablations of a name": (lambda: ablations("default"), "need a SearchConfig"),  # type: ignore[arg-type]
    "service repository config text": (
        lambda: LocalService(repository_config="small"),
        "repository_config must be",
    ),  # type: ignore[arg-type]
    "demo output a number": (lambda: DemoConfig(out_dir=5), "expected a folder or file path"),  # type: ignore[arg-type]
    "output objective of nothing": (lambda: OutputSpaceObjective(None), "validation must be OutputScores"),  # type: ignore[arg-type]
    "no stage": (lambda: SearchConfig(name="x", denoise=None, scale=None), "at least one stage"),
    "seed negative": (lambda: attrs.evolve(SEARCH, seed=-1), "seed"),
    "pool size 0": (lambda: EvoMerge(lambda c, x: [], 0, SEARCH), "n_models"),  # type: ignore[arg-type]
    "service url": (lambda: MergeServiceClient("localhost:8080"), "base_url"),
    "service timeout": (lambda: MergeServiceClient("http://127.0.0.1:1", timeout=0), "timeout"),
    "service tokens": (
        lambda: MergeServiceClient("http://127.0.0.1:1", tokens_per_example=0),
        "tokens_per_example",
    ),
    "service body cap": (lambda: LocalService(max_body_bytes=0), "max_body_bytes"),
    "service sessions": (lambda: LocalService(max_sessions=-3), "max_sessions"),
    "service url not a string": (lambda: MergeServiceClient(5), "base_url must be a URL string"),  # type: ignore[arg-type]
    "api key not a string": (
        lambda: MergeServiceClient("http://127.0.0.1:1", api_key=123),
        "must be a string, got int",
    ),  # type: ignore[arg-type]
    "api key with a line break": (
        lambda: OpenAIProvider(base_url="http://127.0.0.1:1/v1", api_key="sk-a\nb"),
        "printable",
    ),
    "queries to fit NaN": (lambda: fit_to_queries(SEARCH, 5, 300, math.nan), "max_queries"),  # type: ignore[arg-type]
    "random search forever": (
        lambda: anyio.run(lambda: random_search(lambda c, x: [0.0] * len(c), 5, max_evaluations=math.inf)),  # type: ignore[arg-type]
        "max_evaluations must be an integer",
    ),
    "service output a file": (lambda: LocalService(output_dir=__file__), "output_dir .* is a file"),
    "demo output a file": (lambda: DemoConfig(out_dir=__file__), "out_dir .* is a file"),
    "demo cache a file": (lambda: OutputDemoConfig(cache_dir=__file__), "cache_dir .* is a file"),
    "openai max_tokens_field": (
        lambda: OpenAIProvider(base_url="http://127.0.0.1:1/v1", max_tokens_field="tokens"),  # type: ignore[arg-type]
        "max_tokens_field",
    ),
    "anthropic without key": (
        lambda: AnthropicProvider(base_url="http://127.0.0.1:1", api_key=""),
        "API key",
    ),
    "session tokens": (
        lambda: anyio.run(
            lambda: MergeServiceClient("http://127.0.0.1:1").create_session("p", tokens_per_example=-1)
        ),
        "tokens_per_example",
    ),
    "demo result missing": (lambda: load_result("/nonexistent/result.json"), "cannot read"),
    "merged spec with text for a number": (
        lambda: MergedSpec.from_dict(
            {
                "format": MERGED_FORMAT,
                "version": 1,
                "mode": "output",
                "pool": ["a"],
                "alpha": ["x"],
                "beta": [1],
            }
        ),
        "malformed",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_configs_fail_at_construction_naming_the_setting(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    make, needle = CONFIGS[case]
    with pytest.raises(ConfigError, match=needle) as refused:
        make()
    _clear(str(refused.value))


# -- vectors ---------------------------------------------------------------------------------------
VECTORS: dict[str, tuple[Any, Any, str]] = {
    "too short": (np.ones(4), np.ones(4), "5 entries"),
    "too long": (np.ones(6), np.ones(6), "5 entries"),
    "NaN alpha": ([1, 1, math.nan, 1, 1], np.ones(5), "finite"),
    "inf beta": (np.ones(5), [0, 0, 0, math.inf, 0], "finite"),
    "alpha above 1": (np.full(5, 1.5), np.ones(5), r"\[0, 1\]"),
    "alpha negative": (np.full(5, -0.1), np.ones(5), r"\[0, 1\]"),
    "strings": (["a"] * 5, np.ones(5), "numeric"),
    "a matrix": (np.ones((5, 2)), np.ones(5), r"shapes \(5, 2\)"),
    "empty": ([], [], "5 entries"),
    "None": (None, np.ones(5), "alpha"),
}


@pytest.mark.anyio
async def test_bad_vectors_are_refused_before_any_request(repo: Repository) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as svc, MergeServiceClient(svc.url) as client:
        session = await client.create_session(PRESET)
        before = svc.stats.requests
        for case, (alpha, beta, needle) in VECTORS.items():
            with pytest.raises(ConfigError, match=needle) as refused:
                await client.evaluate(session, alpha, beta)
            _clear(str(refused.value))
            assert svc.stats.requests == before, case  # nothing was sent
        with pytest.raises(ConfigError, match="sorted"):
            await client.evaluate(session, np.ones(5), np.ones(5), examples=[3, 1])
        with pytest.raises(ConfigError, match=r"\[0, 60\)"):
            await client.evaluate(session, np.ones(5), np.ones(5), examples=[0, 60])
        assert svc.stats.requests == before


# -- validation data -------------------------------------------------------------------------------
def _examples(repo: Repository, n: int) -> list[dict[str, str]]:
    target = repo.target("ood:ner/news")
    labels = [repo.tokenizer.tokens[int(i)] for i in target.test.labels[:n]]
    return [{"prompt": p, "label": lab} for p, lab in zip(target.test.prompts[:n], labels, strict=True)]


DATA: dict[str, tuple[Callable[[Repository], Any], str]] = {
    "empty": (lambda r: [], "non-empty list"),
    "not a list": (lambda r: "prompt,label\nx,y", "non-empty list"),
    "huge": (lambda r: _examples(r, 3) * 400, "this service takes 1000"),
    "label not in the answer set": (
        lambda r: [*_examples(r, 2), {"prompt": _examples(r, 1)[0]["prompt"], "label": "no-such-label"}],
        r"examples\[2\].label 'no-such-label' is not in the answer set",
    ),
    "label missing": (lambda r: [{"prompt": "a b c"}], r"examples\[0\] must be an object with exactly"),
    "prompt a number": (lambda r: [{"prompt": 5, "label": "x"}], "must be strings"),
    "prompt without words": (
        lambda r: [{"prompt": "   ", "label": _examples(r, 1)[0]["label"]}],
        "has no words",
    ),
    "mojibake prompt": (
        lambda r: [{"prompt": "\udcff\udcfe", "label": _examples(r, 1)[0]["label"]}],
        "not valid Unicode",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(DATA))
async def test_bad_validation_data_is_refused_naming_the_problem(repo: Repository, case: str) -> None:
    make, needle = DATA[case]
    async with (
        LocalService(repo, pool_sizes=(5,), max_inline_examples=1000) as svc,
        Scheduler(retry=ONCE) as scheduler,
        MergeServiceClient(svc.url, scheduler=scheduler) as client,
    ):
        with pytest.raises((InvalidRequest, ConfigError), match=needle) as refused:
            await client.create_session(PRESET, query_plus={"examples": make(repo)})
        _clear(str(refused.value))
        assert svc.open_sessions == 0 and svc.stats.served_requests == 0
        if isinstance(refused.value, InvalidRequest):
            assert refused.value.status == 422


@pytest.mark.anyio
async def test_a_body_in_the_wrong_encoding_is_a_400(repo: Repository) -> None:
    import aiohttp

    async with LocalService(repo, pool_sizes=(5,)) as svc, aiohttp.ClientSession() as http:
        body = json.dumps({"preset_id": "café"}, ensure_ascii=False).encode("latin-1")  # not UTF-8
        async with http.post(f"{svc.url}/v1/sessions", data=body) as resp:
            answer = await resp.json()
        assert resp.status == 400 and "not valid JSON" in answer["error"]["message"]
        assert svc.open_sessions == 0


# -- provider answers ------------------------------------------------------------------------------
@attrs.define
class Canned:
    """What the loopback server answers: a body, a status, and whether it announces its length."""

    body: bytes
    status: int = 200
    chunked: bool = False


@asynccontextmanager
async def canned_server(answers: Callable[[web.Request], Canned]) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        canned = answers(request)
        if not canned.chunked:
            return web.Response(body=canned.body, status=canned.status, content_type="application/json")
        resp = web.StreamResponse(status=canned.status)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(canned.body), 1 << 14):
            await resp.write(canned.body[i : i + (1 << 14)])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


OK_CHOICE = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
OK_USAGE = {"prompt_tokens": 3, "completion_tokens": 1}
HUGE = b'{"choices": [], "padding": "' + b"x" * 300_000 + b'"}'
OPENAI_ANSWERS: dict[str, tuple[Canned, str]] = {
    "not JSON": (Canned(b"<html>502 Bad Gateway</html>"), "answer is not JSON"),
    "not UTF-8": (Canned(b'{"choices": "\xff\xfe"}'), "not UTF-8"),
    "a JSON list": (Canned(b"[1, 2]"), "answer is not a JSON object"),
    "choices missing": (Canned(_json({"model": "m", "usage": OK_USAGE})), "answer.choices"),
    "choices empty": (Canned(_json({"choices": [], "usage": OK_USAGE})), "choices is empty"),
    "message a string": (Canned(_json({"choices": [{"message": "hi"}]})), r"choices\[0\].message"),
    "content a number": (
        Canned(_json({"choices": [{"message": {"content": 5}}], "usage": OK_USAGE})),
        r"choices\[0\].message.content should be a str",
    ),
    "usage tokens a string": (
        Canned(_json({"choices": [OK_CHOICE], "usage": {"prompt_tokens": "3", "completion_tokens": 1}})),
        "usage.prompt_tokens should be a int",
    ),
    "usage negative": (
        Canned(_json({"choices": [OK_CHOICE], "usage": {"prompt_tokens": -300, "completion_tokens": 1}})),
        "impossible usage",
    ),
    "NaN logprob": (
        Canned(
            b'{"choices": [{"index": 0, "message": {"content": "a"}, "logprobs": {"content": '
            b'[{"token": "a", "logprob": NaN, "top_logprobs": []}]}}], "usage": ' + _json(OK_USAGE) + b"}"
        ),
        r"logprobs.content\[0\].logprob is nan",
    ),
    "logprob a string": (
        Canned(
            _json(
                {
                    "choices": [{**OK_CHOICE, "logprobs": {"content": [{"token": "a", "logprob": "-1"}]}}],
                    "usage": OK_USAGE,
                }
            )
        ),
        r"content\[0\].logprob should be a float",
    ),
    "enormous body": (Canned(HUGE), "longer than 100000 bytes"),
    "enormous chunked body": (Canned(HUGE, chunked=True), "longer than 100000 bytes"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(OPENAI_ANSWERS))
async def test_malformed_openai_answers_are_bad_responses_naming_the_field(case: str) -> None:
    canned, needle = OPENAI_ANSWERS[case]
    request = ChatRequest(model="gpt-4o-mini", messages="hi", max_tokens=2, logprobs=True)
    async with (
        canned_server(lambda r: canned) as url,
        OpenAIProvider(base_url=f"{url}/v1", api_key="sk-x") as provider,
        Scheduler(retry=ONCE, budget=Budget(tokens=1000)) as scheduler,
    ):
        provider._http.max_answer_bytes = 100_000
        with pytest.raises(BadResponse, match=needle) as refused:
            await scheduler.complete(provider, request)
        _clear(str(refused.value))
        # The outcome is unknown: charged at its worst case, never less (the budget stays hard).
        assert scheduler.spent().tokens == scheduler.spent().unknown_tokens > 0
        assert scheduler.cache is not None and len(scheduler.cache) == 0  # nothing bad is cached


ANTHROPIC_ANSWERS: dict[str, tuple[bytes, str]] = {
    "content missing": (_json({"usage": {"input_tokens": 1, "output_tokens": 1}}), "answer.content"),
    "text missing": (
        _json({"content": [{"type": "text"}], "usage": {"input_tokens": 1, "output_tokens": 1}}),
        r"content\[0\].text",
    ),
    "usage a float": (
        _json({"content": [], "usage": {"input_tokens": 1.5, "output_tokens": 1}}),
        "usage.input_tokens should be a int",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(ANTHROPIC_ANSWERS))
async def test_malformed_anthropic_answers_are_bad_responses_naming_the_field(case: str) -> None:
    body, needle = ANTHROPIC_ANSWERS[case]
    request = ChatRequest(model="claude-3-5-haiku", messages="hi", max_tokens=2)
    async with (
        canned_server(lambda r: Canned(body)) as url,
        AnthropicProvider(base_url=url, api_key="sk-ant-x") as provider,
        Scheduler(retry=ONCE) as scheduler,
    ):
        with pytest.raises(BadResponse, match=needle) as refused:
            await scheduler.complete(provider, request)
        _clear(str(refused.value))


SESSION = {"session_id": "s1", "preset_id": PRESET, "adapter_count": 5, "n_examples": 60,
           "max_tokens_per_evaluation": 720, "max_tokens_per_example": 14}  # fmt: skip
HEALTH = {"status": "ok", "extensions": ["usage", "metrics", "minibatch"]}
SERVICE_ANSWERS: dict[str, tuple[Any, str]] = {
    "loss missing": ({"accuracy": 0.5}, "answer.loss is missing"),
    "loss a string": ({"loss": "0.5"}, "answer.loss should be a number"),
    "usage negative": ({"loss": 0.5, "usage": {"input_tokens": -720}}, "usage.input_tokens"),
    "usage a list": ({"loss": 0.5, "usage": [720]}, "usage is not an object"),
    "accuracy a string": ({"loss": 0.5, "accuracy": "high"}, "answer.accuracy"),
    "a list": ([0.5], "not a JSON object"),
    "no session id": ("session", "no session_id"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(SERVICE_ANSWERS))
async def test_malformed_merge_service_answers_are_bad_responses_naming_the_field(case: str) -> None:
    answer, needle = SERVICE_ANSWERS[case]

    def answers(request: web.Request) -> Canned:
        if request.path == "/health":
            return Canned(_json(HEALTH))
        if request.path == "/v1/sessions":
            return Canned(_json({"adapter_count": 5} if answer == "session" else SESSION))
        return Canned(_json(answer))

    async with (
        canned_server(answers) as url,
        Scheduler(retry=ONCE) as scheduler,
        MergeServiceClient(url, scheduler=scheduler, tokens_per_example=12) as client,
    ):
        with pytest.raises(BadResponse, match=needle) as refused:
            session = await client.create_session(PRESET)
            await client.evaluate(session, np.ones(5), np.full(5, 0.2))
        _clear(str(refused.value))


# -- a failing run corrupts nothing ----------------------------------------------------------------
@pytest.mark.anyio
async def test_a_run_that_fails_on_broken_answers_leaves_checkpoint_and_cache_intact(
    repo: Repository, tmp_path: Path
) -> None:
    checkpoint, cache = tmp_path / "checkpoint.json", tmp_path / "cache.sqlite"
    stop_early = Budget(tokens=5 * 6 * 720)  # five generations, then the budget ends the first run
    async with LocalService(repo, pool_sizes=(5,)) as healthy:
        first = await run_search(healthy.url, checkpoint=checkpoint, cache=cache, budget=stop_early)
    saved, entries = checkpoint.read_bytes(), first.metrics.succeeded - 1  # minus create_session
    # Every answer of this service is malformed: the resumed run fails after its retries...
    broken = FaultConfig(seed=0, malformed_rate=1.0, max_faults_per_request=None)
    async with LocalService(repo, pool_sizes=(5,), faults=broken) as bad:
        with pytest.raises(BadResponse, match="not JSON"):
            await run_search(bad.url, checkpoint=checkpoint, cache=cache, retry=RetryPolicy(max_attempts=2))
    # ...and leaves the checkpoint byte for byte, and every cached answer, as they were.
    assert checkpoint.read_bytes() == saved
    reopened = ResponseCache(cache)
    await reopened.open()
    try:
        assert len(reopened) == entries
    finally:
        await reopened.aclose()
    async with LocalService(repo, pool_sizes=(5,)) as healthy:
        resumed = await run_search(healthy.url, checkpoint=checkpoint, cache=cache)
        whole = await run_search(healthy.url, cache=False)
    assert resumed.result.to_dict() == whole.result.to_dict()


# -- CLI arguments ---------------------------------------------------------------------------------
CLI: dict[str, tuple[list[str], str]] = {
    "no command": ([], "required: COMMAND"),
    "unknown command": (["merge-everything"], "invalid choice"),
    "pool size 0": (["demo", "--pool-size", "0"], "--pool-size: must be >= 1"),
    "pool size a word": (["demo", "--pool-size", "many"], "--pool-size: invalid"),
    "seed negative": (["demo", "--seed", "-3"], "--seed: must be >= 0"),
    "budget 0": (["demo", "--budget", "0"], "--budget: must be >= 1"),
    "unknown preset": (["demo", "--preset", "fastest"], "unknown preset 'fastest'"),
    "unknown flag": (["demo", "--turbo"], "unrecognized arguments: --turbo"),
    "error rate > 1": (["serve-local", "--error-rate", "2"], "FaultConfig.error_rate"),
    "rpm negative": (["serve-local", "--rpm", "-5"], "ServerLimits.rpm"),
    "rpm a word": (["serve-local", "--rpm", "lots"], "--rpm: invalid float value"),
    "port too big": (["serve-local", "--small", "--port", "70000"], "port must be in [0, 65535]"),
    "open host without key": (["serve-local", "--host", "0.0.0.0"], "needs an api_key"),
}


@pytest.mark.parametrize("case", sorted(CLI))
def test_bad_cli_arguments_exit_2_with_one_clear_line(
    case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.delenv("EVOMERGE_API_KEY", raising=False)
    argv, needle = CLI[case]
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert (last.startswith("evomerge") and needle.split(":")[0].strip("-") in last) or needle in last, err


@pytest.mark.anyio
async def test_an_objective_that_answers_the_wrong_count_is_named() -> None:
    async def objective(candidates: Any, context: Any) -> list[float]:
        return [0.0] * (len(candidates) - 1)

    with pytest.raises(ConfigError, match="returned 5 losses for 6 candidates"):
        await EvoMerge(objective, 5, SEARCH).run()
    assert issubclass(BadResponse, EvomergeError) and issubclass(ConfigError, EvomergeError)


def test_a_port_in_use_is_a_clear_cli_error(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(["serve-local", "--small", "--pool-sizes", "5", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err, err


@pytest.mark.anyio
async def test_a_broken_log_sink_never_hangs_the_cache(tmp_path: Path, restore_logging: None) -> None:
    """A non-JSON value is logged by the cache's writer thread; a log stream that fails must not kill it."""
    import io

    dead = io.StringIO()
    dead.close()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(dead))
    cache = ResponseCache(tmp_path / "c.sqlite")
    await cache.open()
    try:
        cache.put("bad", {"x": {1, 2}}, Usage())
        cache.put("good", {"x": 1}, Usage())
        with anyio.fail_after(30), pytest.raises(StorageError, match="1 result"):
            await cache.flush()  # the failure is raised, though its log line could not be written
        assert cache.write_errors == 1
    finally:
        with anyio.fail_after(30):
            await cache.aclose()
    reopened = ResponseCache(tmp_path / "c.sqlite")
    await reopened.open()
    try:
        assert reopened.on_disk("good") and not reopened.on_disk("bad")
    finally:
        await reopened.aclose()
