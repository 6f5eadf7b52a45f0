"""The embedded merge service over real HTTP: every route, every refusal; a refusal changes nothing."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.backend import InvalidField
from evomerge_sdk.local.faults import ServerLimits
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.local.sessions import EXTENSIONS, MAX_ABS_BETA, parse_vectors


@pytest.fixture
async def service(repo: Repository, tmp_path: Path) -> AsyncIterator[LocalService]:
    async with LocalService(repo, pool_sizes=(5,), output_dir=tmp_path) as svc:
        yield svc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with http.request(method, url, data=data, headers=hdrs) as resp:
        text = await resp.text()
        return resp.status, resp.headers, json.loads(text) if text else None


PRESET = preset_id("ood:ner/news", 5)


async def new_session(http: aiohttp.ClientSession, svc: LocalService, **query_plus: Any) -> dict[str, Any]:
    status, _, body = await call(
        http, "POST", f"{svc.url}/v1/sessions", {"preset_id": PRESET, "query_plus": query_plus}
    )
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def vectors(n: int, seed: int = 0) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    return rng.random(n).tolist(), rng.normal(0.0, 0.3, n).tolist()


# -- reference routes ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_health_and_presets(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository
) -> None:
    status, _, health = await call(http, "GET", f"{service.url}/health")
    assert status == 200 and health["status"] == "ok" and health["extensions"] == list(EXTENSIONS)
    assert health["concurrent_evaluation"] == "safe"
    status, _, presets = await call(http, "GET", f"{service.url}/v1/presets")
    ids = {p["preset_id"]: p for p in presets["items"]}
    assert set(ids) == {preset_id(t.name, 5) for t in repo.targets()} | {"hub"}
    entry = ids[PRESET]
    assert entry["adapter_count"] == 5 and entry["adapters"] == repo.pool("ood:ner/news", 5, 0)
    assert "ood:ner/news:validation" in entry["datasets"] and "ner/news" not in entry["adapters"]
    assert ids["hub"]["adapter_count"] == len(repo.adapter_names)


@pytest.mark.anyio
async def test_evaluate_is_the_repository_merge_loss(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository
) -> None:
    session = await new_session(http, service)
    assert session["adapter_count"] == 5 and session["n_examples"] == 60
    target = repo.target("ood:ner/news")
    assert session["max_tokens_per_evaluation"] == int((target.validation.lengths + 1).sum())
    alpha, beta = vectors(5)
    url = f"{service.url}/v1/sessions/{session['session_id']}/evaluate"
    status, _, answer = await call(http, "POST", url, {"alpha": alpha, "beta": beta, "tag": "t1"})
    assert status == 200
    want = repo.evaluate(repo.merge(session["adapters"], alpha, beta), target.validation)
    assert answer["loss"] == want.loss and answer["accuracy"] == want.accuracy
    assert answer["macro_f1"] == want.macro_f1 and answer["tag"] == "t1"
    assert answer["usage"] == {
        "input_tokens": session["max_tokens_per_evaluation"],
        "output_tokens": 0,
        "total_tokens": session["max_tokens_per_evaluation"],
    }
    # the minibatch extension scores (and bills) only the examples asked for
    idx = [1, 4, 9, 30]
    status, _, part = await call(http, "POST", url, {"alpha": alpha, "beta": beta, "examples": idx})
    sub = target.validation.subset(np.array(idx))
    assert status == 200 and part["n_examples"] == 4
    assert part["loss"] == repo.evaluate(repo.merge(session["adapters"], alpha, beta), sub).loss
    assert part["usage"]["input_tokens"] == int((sub.lengths + 1).sum())


@pytest.mark.anyio
async def test_named_datasets_and_evaluation_batches(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository
) -> None:
    test = await new_session(http, service, dataset="ood:ner/news:test")
    held = await new_session(http, service, dataset="ood:ner/news:held_out")
    capped = await new_session(http, service, batch_size=8, evaluation_batches=2)
    assert (test["n_examples"], held["n_examples"], capped["n_examples"]) == (100, 20, 16)
    hub = await call(
        http,
        "POST",
        f"{service.url}/v1/sessions",
        {"preset_id": "hub", "query_plus": {"dataset": "id:et/law:validation"}},
    )
    assert hub[0] == 200 and hub[2]["adapter_count"] == len(repo.adapter_names)


@pytest.mark.anyio
async def test_inline_examples(service: LocalService, http: aiohttp.ClientSession, repo: Repository) -> None:
    target = repo.target("ood:ner/news")
    labels = [repo.tokenizer.tokens[int(i)] for i in target.test.labels[:7]]
    examples = [{"prompt": p, "label": lab} for p, lab in zip(target.test.prompts[:7], labels, strict=True)]
    session = await new_session(http, service, examples=examples)
    assert session["n_examples"] == 7 and session["dataset"] == "inline"
    alpha, beta = vectors(5, 3)
    status, _, answer = await call(
        http,
        "POST",
        f"{service.url}/v1/sessions/{session['session_id']}/evaluate",
        {"alpha": alpha, "beta": beta},
    )
    merged = repo.merge(session["adapters"], alpha, beta)
    assert status == 200 and answer["loss"] == repo.evaluate(merged, target.test.subset(slice(0, 7))).loss


BAD_QUERY_PLUS = [
    ({"examples": []}, "non-empty"),
    ({"examples": [{"prompt": "ner: a ?", "label": "purple"}]}, "answer set"),
    ({"examples": [{"prompt": 3, "label": "red"}]}, "strings"),
    ({"examples": [{"prompt": "ner: a ?", "label": "red", "extra": 1}]}, "exactly prompt and label"),
    ({"examples": [{"prompt": "   ", "label": "red"}]}, "no words"),
    ({"examples": [{"prompt": "a", "label": "red"}] * 4}, "takes 3"),
    ({"examples": [{"prompt": "a", "label": "red"}], "dataset": "ood:ner/news:test"}, "not both"),
    ({"dataset": "ood:re/bio:test"}, "has no dataset"),
    ({"dataset": "ood:ner/news:train"}, "split"),
    ({"batch_size": 0}, "batch_size"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"datset": "x"}, "unknown fields"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("query_plus", "message"), BAD_QUERY_PLUS)
async def test_bad_sessions_are_422_and_create_nothing(
    repo: Repository, http: aiohttp.ClientSession, query_plus: dict[str, Any], message: str
) -> None:
    async with LocalService(repo, pool_sizes=(5,), max_inline_examples=3) as svc:
        body = {"preset_id": PRESET, "query_plus": query_plus}
        status, _, answer = await call(http, "POST", f"{svc.url}/v1/sessions", body)
        assert status == 422 and message in answer["error"]["message"]
        assert svc.open_sessions == 0


@pytest.mark.anyio
async def test_unknown_preset_and_model(service: LocalService, http: aiohttp.ClientSession) -> None:
    status, _, answer = await call(http, "POST", f"{service.url}/v1/sessions", {"preset_id": "nope"})
    assert status == 404 and "unknown preset_id" in answer["error"]["message"]
    body = {"preset_id": PRESET, "model_name_or_path": "llama"}
    status, _, answer = await call(http, "POST", f"{service.url}/v1/sessions", body)
    assert status == 422 and "model_name_or_path" in answer["error"]["message"]
    assert service.open_sessions == 0


BAD_VECTORS = [
    ('{"alpha": [0.5, 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "5 entries"),
    ('{"alpha": [0.5, 0.5, NaN, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha[2] must be finite"),
    (
        '{"alpha": [0.5, 0.5, 0.5, 0.5, 0.5], "beta": [0.1, Infinity, 0.1, 0.1, 0.1]}',
        "beta[1] must be finite",
    ),
    ('{"alpha": [0.5, 0.5, 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 1e400, 0.1, 0.1]}', "beta[2] must be finite"),
    ('{"alpha": [0.5, "x", 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha[1] must be a number"),
    ('{"alpha": [0.5, true, 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha[1] must be a number"),
    ('{"alpha": [0.5, 1.5, 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha[1] = 1.5"),
    ('{"alpha": [0.5, 0.5, 0.5, 0.5, -0.1], "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha[4] = -0.1"),
    ('{"alpha": [0.5, 0.5, 0.5, 0.5, 0.5], "beta": [0.1, 0.1, 0.1, 0.1, 5000]}', "beta entries"),
    ('{"alpha": [0.5, 0.5, 0.5, 0.5, 0.5]}', "beta must be a list"),
    ('{"alpha": 0.5, "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}', "alpha must be a list"),
    ('{"alpha": [1, 1, 1, 1, 1], "beta": [0, 0, 0, 0, 0], "examples": [3, 1]}', "sorted and distinct"),
    ('{"alpha": [1, 1, 1, 1, 1], "beta": [0, 0, 0, 0, 0], "examples": [0, 60]}', "must lie in [0, 60)"),
    ('{"alpha": [1, 1, 1, 1, 1], "beta": [0, 0, 0, 0, 0], "examples": []}', "non-empty list"),
    ('{"alpha": [1, 1, 1, 1, 1], "beta": [0, 0, 0, 0, 0], "exmples": [1]}', "unknown fields"),
    ("[1, 2]", "JSON object"),
]


@pytest.mark.anyio
async def test_malformed_vectors_are_422_and_change_nothing(
    service: LocalService, http: aiohttp.ClientSession
) -> None:
    session = await new_session(http, service)
    url = f"{service.url}/v1/sessions/{session['session_id']}/evaluate"
    alpha, beta = vectors(5)
    _, _, before = await call(http, "POST", url, {"alpha": alpha, "beta": beta})
    served = service.stats.as_dict()
    for raw, message in BAD_VECTORS:
        status, _, answer = await call(http, "POST", url, raw=raw.encode())
        assert status == 422, raw
        assert message in answer["error"]["message"], (raw, answer)
    for route in ("materialize", "complete"):
        status, _, _ = await call(
            http, "POST", url.replace("/evaluate", f"/{route}"), raw=BAD_VECTORS[1][0].encode()
        )
        assert status == 422
    after = service.stats.as_dict()
    assert after["served_requests"] == served["served_requests"]
    assert after["served_tokens"] == served["served_tokens"]
    assert service.open_sessions == 1
    _, _, again = await call(http, "POST", url, {"alpha": alpha, "beta": beta})
    assert again == before


@pytest.mark.anyio
async def test_unknown_session_is_404_on_every_session_route(
    service: LocalService, http: aiohttp.ClientSession
) -> None:
    alpha, beta = vectors(5)
    body = {"alpha": alpha, "beta": beta, "prompt": "ner: a ?"}
    for route in ("evaluate", "materialize", "complete"):
        status, _, answer = await call(http, "POST", f"{service.url}/v1/sessions/sess_nope/{route}", body)
        assert status == 404 and "unknown session" in answer["error"]["message"]
    status, _, _ = await call(http, "DELETE", f"{service.url}/v1/sessions/sess_nope")
    assert status == 404


@pytest.mark.anyio
async def test_unreadable_bodies_routes_and_methods(
    service: LocalService, http: aiohttp.ClientSession
) -> None:
    status, _, answer = await call(http, "POST", f"{service.url}/v1/sessions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, _, answer = await call(http, "GET", f"{service.url}/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    assert answer["error"]["message"] == "no route GET /v1/nothing: see GET /health and GET /v1/presets"
    status, _, answer = await call(http, "GET", f"{service.url}/v1/sessions")
    assert status == 405 and answer["error"]["type"] == "method_not_allowed"


@pytest.mark.anyio
async def test_oversized_body_is_413(repo: Repository, http: aiohttp.ClientSession) -> None:
    async with LocalService(repo, pool_sizes=(5,), max_body_bytes=4096) as svc:
        examples = [{"prompt": "ner: " + "word " * 20 + "?", "label": "red"}] * 100
        body = {"preset_id": PRESET, "query_plus": {"examples": examples}}
        status, _, answer = await call(http, "POST", f"{svc.url}/v1/sessions", body)
        assert status == 413 and "4096 bytes" in answer["error"]["message"]
        assert svc.open_sessions == 0


@pytest.mark.anyio
async def test_bearer_token_auth(repo: Repository, http: aiohttp.ClientSession) -> None:
    key = "sk-local-test-key-123"
    async with LocalService(repo, pool_sizes=(5,), api_key=key) as svc:
        assert key not in repr(svc)
        assert (await call(http, "GET", f"{svc.url}/health"))[0] == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            status, resp_headers, answer = await call(http, "GET", f"{svc.url}/v1/presets", headers=headers)
            assert status == 401 and resp_headers["WWW-Authenticate"] == "Bearer"
            assert key not in json.dumps(answer)
        status, _, _ = await call(
            http, "GET", f"{svc.url}/v1/presets", headers={"Authorization": f"Bearer {key}"}
        )
        assert status == 200


@pytest.mark.anyio
async def test_session_cap_is_503_until_one_is_deleted(repo: Repository, http: aiohttp.ClientSession) -> None:
    async with LocalService(repo, pool_sizes=(5,), max_sessions=2) as svc:
        first = await new_session(http, svc)
        await new_session(http, svc)
        status, headers, answer = await call(http, "POST", f"{svc.url}/v1/sessions", {"preset_id": PRESET})
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "at most 2 open sessions" in answer["error"]["message"] and svc.open_sessions == 2
        status, _, deleted = await call(http, "DELETE", f"{svc.url}/v1/sessions/{first['session_id']}")
        assert status == 200 and deleted["deleted"] is True
        await new_session(http, svc)


@pytest.mark.anyio
async def test_idle_sessions_expire(repo: Repository, http: aiohttp.ClientSession) -> None:
    async with LocalService(repo, pool_sizes=(5,), session_ttl=0.01) as svc:
        session = await new_session(http, svc)
        await anyio.sleep(0.05)
        alpha, beta = vectors(5)
        url = f"{svc.url}/v1/sessions/{session['session_id']}/evaluate"
        assert (await call(http, "POST", url, {"alpha": alpha, "beta": beta}))[0] == 404


@pytest.mark.anyio
async def test_materialize_writes_the_merged_pairs_and_serves_them(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository, tmp_path: Path
) -> None:
    session = await new_session(http, service)
    alpha, beta = vectors(5, 7)
    url = f"{service.url}/v1/sessions/{session['session_id']}/materialize"
    status, _, answer = await call(http, "POST", url, {"alpha": alpha, "beta": beta, "tag": "best"})
    assert status == 200 and Path(answer["path"]).parent == tmp_path and answer["tag"] == "best"
    pairs = repo.merger(session["adapters"]).merged_pairs(alpha, beta)
    with np.load(answer["path"]) as data:
        meta = json.loads(str(data["meta"]))
        assert meta["adapters"] == session["adapters"] and meta["alpha"] == alpha
        for k, (a_m, b_m) in enumerate(pairs):
            np.testing.assert_array_equal(data[f"a{k}"], a_m)
            np.testing.assert_array_equal(data[f"b{k}"], b_m)
    status, _, models = await call(http, "GET", f"{service.url}/v1/models")
    assert answer["adapter_name"] in {m["id"] for m in models["data"]}
    chat = {"model": answer["adapter_name"], "messages": [{"role": "user", "content": "ner: kiplu ?"}]}
    status, _, reply = await call(http, "POST", f"{service.url}/v1/chat/completions", chat)
    merged = repo.merge(session["adapters"], alpha, beta)
    top = repo.top_logprobs(merged, "ner: kiplu ?", 1)[0][0]
    assert status == 200 and reply["choices"][0]["message"]["content"] == top


@pytest.mark.anyio
async def test_complete_answers_the_merged_models_next_token(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository
) -> None:
    session = await new_session(http, service)
    alpha, beta = vectors(5, 2)
    prompt = repo.target("ood:ner/news").test.prompts[0]
    body = {"alpha": alpha, "beta": beta, "prompt": prompt, "top_logprobs": 3}
    url = f"{service.url}/v1/sessions/{session['session_id']}/complete"
    status, _, answer = await call(http, "POST", url, body)
    want = repo.top_logprobs(repo.merge(session["adapters"], alpha, beta), prompt, 3)
    assert status == 200 and answer["text"] == want[0][0]
    got = [(t["token"], t["logprob"]) for t in answer["logprobs"][0]["top_logprobs"]]
    assert got == want
    words = len(repo.tokenizer.split(prompt))
    assert answer["usage"] == {"input_tokens": words, "output_tokens": 1, "total_tokens": words + 1}
    sampled = [
        (await call(http, "POST", url, {**body, "temperature": 1.0, "seed": 11}))[2]["text"] for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # sampling is a function of the request


@pytest.mark.anyio
async def test_chat_completions_over_base_and_adapters(
    service: LocalService, http: aiohttp.ClientSession, repo: Repository
) -> None:
    prompt = repo.target("ood:ner/news").validation.prompts[3]
    url = f"{service.url}/v1/chat/completions"
    for model, weights in (("base", repo.base), ("ner/bio", repo.single("ner/bio"))):
        body = {
            "model": model,
            "messages": [{"role": "system", "content": "label it"}, {"role": "user", "content": prompt}],
            "logprobs": True,
            "top_logprobs": 2,
            "max_tokens": 4,
        }
        status, _, reply = await call(http, "POST", url, body)
        # The chat template reads every turn, the system message included.
        want = repo.top_logprobs(weights, f"label it {prompt}", 2)
        assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == model
        content = reply["choices"][0]["logprobs"]["content"][0]
        assert reply["choices"][0]["message"]["content"] == content["token"] == want[0][0]
        assert [(t["token"], t["logprob"]) for t in content["top_logprobs"]] == want
        words = len(repo.tokenizer.split(f"label it {prompt}"))
        assert reply["usage"]["prompt_tokens"] == words and reply["usage"]["completion_tokens"] == 1


BAD_CHATS = [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "base", "messages": []}, 400, "non-empty list"),
    ({"model": "base", "messages": [{"role": "system", "content": "x"}]}, 400, "user message"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
]


@pytest.mark.anyio
async def test_malformed_chats(service: LocalService, http: aiohttp.ClientSession) -> None:
    for body, want_status, message in BAD_CHATS:
        status, _, answer = await call(http, "POST", f"{service.url}/v1/chat/completions", body)
        assert status == want_status and message in answer["error"]["message"], (body, answer)


@pytest.mark.anyio
async def test_rpm_limit_answers_429_with_retry_after(repo: Repository, http: aiohttp.ClientSession) -> None:
    async with LocalService(repo, pool_sizes=(5,), limits=ServerLimits(rpm=60, burst_seconds=0.5)) as svc:
        body = {"model": "base", "messages": [{"role": "user", "content": "ner: a ?"}]}
        statuses, limited = [], None
        for _ in range(4):
            status, headers, answer = await call(http, "POST", f"{svc.url}/v1/chat/completions", body)
            statuses.append(status)
            if status == 429:
                limited = (headers, answer)
        assert statuses[0] == 200 and 429 in statuses
        assert limited is not None
        headers, answer = limited
        assert int(headers["Retry-After"]) >= 1 and headers["x-ratelimit-limit-requests"] == "60"
        assert answer["error"]["type"] == "rate_limit_exceeded"
        assert (await call(http, "GET", f"{svc.url}/v1/presets"))[0] == 200  # control routes stay open


@pytest.mark.anyio
async def test_concurrent_requests_get_the_same_answers_as_sequential_ones(
    service: LocalService, http: aiohttp.ClientSession
) -> None:
    session = await new_session(http, service)
    url = f"{service.url}/v1/sessions/{session['session_id']}/evaluate"
    bodies = [dict(zip(("alpha", "beta"), vectors(5, s), strict=True)) for s in range(12)]
    sequential = [(await call(http, "POST", url, b))[2]["loss"] for b in bodies]
    concurrent: list[float] = [0.0] * len(bodies)

    async def one(i: int) -> None:
        concurrent[i] = (await call(http, "POST", url, bodies[i]))[2]["loss"]

    async with anyio.create_task_group() as tg:
        for i in range(len(bodies)):
            tg.start_soon(one, i)
    assert concurrent == sequential


@pytest.mark.anyio
async def test_presets_skip_pool_sizes_the_repository_cannot_fill(repo: Repository) -> None:
    async with LocalService(repo) as svc:  # sizes 5, 20, 100 on the small repository
        assert svc.backend is not None
        assert sorted(svc.backend.presets) == sorted([preset_id(t.name, 5) for t in repo.targets()] + ["hub"])
    with pytest.raises(ConfigError, match=r"pool sizes \[50\] do not fit a repository of \d+ adapters"):
        async with LocalService(repo, pool_sizes=(50,)):
            pass


def test_non_loopback_needs_a_key(repo: Repository) -> None:
    with pytest.raises(ConfigError, match="needs an api_key"):
        LocalService(repo, host="0.0.0.0")
    with pytest.raises(ConfigError, match="max_sessions"):
        LocalService(repo, max_sessions=0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.booleans(), st.text(max_size=2)),
        max_size=6,
    ),
    st.lists(st.floats(-2000, 2000), min_size=5, max_size=5),
)
def test_vectors_are_accepted_exactly_when_valid(alpha: list[Any], beta: list[float]) -> None:
    valid = (
        len(alpha) == 5
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in alpha)
        and all(math.isfinite(x) and 0 <= x <= 1 for x in alpha)
        and all(abs(b) <= MAX_ABS_BETA for b in beta)
    )
    try:
        a, b = parse_vectors({"alpha": alpha, "beta": beta}, 5)
    except InvalidField:  # answered 422 by the server
        assert not valid
    else:
        assert valid and a.tolist() == [float(x) for x in alpha] and b.tolist() == beta
