"""The client against the authors' reference service as it really behaves (issue 15), one test per row.

The server is `LocalService(reference_only=True)`: the authors' routes, field names, FastAPI errors, bare
500s, unseeded random batches and unsafe concurrency, over the embedded repository (DESIGN 3). Its own
fidelity is checked over raw HTTP first, so the client tests below meet what the real service does.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import attrs
import numpy as np
import pytest
import structlog

from evomerge_sdk import (
    Budget,
    InvalidRequest,
    MergeServiceClient,
    Scheduler,
    ServiceObjective,
)
from evomerge_sdk.engine import Candidate, EvaluationContext, Split
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local import FaultConfig, LocalService, preset_id
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.scheduler import RetryPolicy
from evomerge_sdk.service import REFERENCE_QUERY_PLUS_DEFAULTS

pytestmark = pytest.mark.anyio

TARGET = "ood:ner/news"
PRESET = preset_id(TARGET, 5)
PER_EXAMPLE = 12  # the small embedded world's examples are 12 tokens
WHOLE = {"dataset": f"{TARGET}:validation", "batch_size": 60, "evaluation_batches": 1}
"""One batch holding all 60 validation examples: the reference's loss without its sampling noise."""
FAST = RetryPolicy(max_attempts=6, base_delay=0.001, max_delay=0.01, seed=0)


@pytest.fixture
async def reference(repo: Repository, tmp_path: Path) -> AsyncIterator[LocalService]:
    async with LocalService(repo, pool_sizes=(5,), reference_only=True, output_dir=tmp_path) as svc:
        yield svc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, str, Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        return (
            resp.status,
            resp.content_type,
            (await resp.json() if resp.content_type == "application/json" else text),
        )


def vectors(seed: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.3, 1.0, n), rng.normal(0.0, 0.4, n)


def client(svc: LocalService, **kwargs: Any) -> MergeServiceClient:
    return MergeServiceClient(svc.url, tokens_per_example=PER_EXAMPLE, **kwargs)


def whole_loss(repo: Repository, names: list[str], alpha: np.ndarray, beta: np.ndarray) -> float:
    return repo.evaluate(repo.merge(names, alpha, beta), repo.target(TARGET).validation).loss


# -- the imitation answers as the reference does --------------------------------------------------
async def test_the_imitation_answers_with_the_references_fields_and_errors(
    reference: LocalService, http: aiohttp.ClientSession
) -> None:
    url = reference.url
    assert (await call(http, "GET", f"{url}/health"))[2] == {"status": "ok"}
    items = (await call(http, "GET", f"{url}/v1/presets"))[2]["items"]
    assert all(set(item) == {"preset_id", "path", "base_model_name_or_path"} for item in items)
    status, _, session = await call(http, "POST", f"{url}/v1/sessions", {"preset_id": PRESET})
    assert status == 200
    assert set(session) == {
        "session_id",
        "preset_id",
        "workdir",
        "model_name_or_path",
        "query_plus",
        "adapter_count",
    }
    assert session["adapter_count"] == 5 and session["query_plus"]["evaluation_batches"] == 20
    sid = session["session_id"]
    assert (await call(http, "GET", f"{url}/v1/sessions/{sid}"))[2] == session
    # A partial query_plus replaces the preset's whole one: every other field at the schema default.
    body = {"preset_id": PRESET, "query_plus": {"dataset": f"{TARGET}:held_out", "batch_size": 4}}
    partial = (await call(http, "POST", f"{url}/v1/sessions", body))[2]["query_plus"]
    assert partial == {"dataset": f"{TARGET}:held_out", **REFERENCE_QUERY_PLUS_DEFAULTS, "batch_size": 4}
    # dataset is required (FastAPI 422); an unknown preset is a bare 500.
    status, _, answer = await call(
        http, "POST", f"{url}/v1/sessions", {"preset_id": PRESET, "query_plus": {}}
    )
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "query_plus", "dataset"]
    assert await call(http, "POST", f"{url}/v1/sessions", {"preset_id": "nope"}) == (
        500,
        "text/plain",
        "Internal Server Error",
    )
    alpha, beta = vectors(0)
    evaluate = f"{url}/v1/sessions/{sid}/evaluate"
    status, _, answer = await call(http, "POST", evaluate, {"alpha": alpha.tolist(), "beta": beta.tolist()})
    assert status == 200 and set(answer) == {"loss", "adapter_dir"} and "usage" not in answer
    assert answer["adapter_dir"] == f"artifacts/{sid}/artifacts/manual"
    wrong = {"alpha": [1.0] * 4, "beta": [0.2] * 4}
    assert (await call(http, "POST", evaluate, wrong))[0] == 500  # a wrong length
    assert (await call(http, "POST", evaluate, {"alpha": "x", "beta": []}))[0] == 422
    huge = {"alpha": [1.0] * 5, "beta": [1e300] * 5}  # the loss overflows: JSON cannot carry it
    assert (await call(http, "POST", evaluate, huge))[0] == 500
    assert (await call(http, "POST", f"{url}/v1/sessions/gone/evaluate", huge))[2] == {
        "detail": "Unknown session."
    }
    status, _, answer = await call(
        http,
        "POST",
        f"{url}/v1/sessions/{sid}/materialize",
        {"alpha": [1.0] * 5, "beta": [0.2] * 5, "tag": "best"},
    )
    assert set(answer) == {"adapter_dir", "session"} and answer["session"] == session
    assert (reference.output_dir / answer["adapter_dir"]).is_dir()
    for method, path in (
        ("DELETE", f"/v1/sessions/{sid}"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/stats"),
    ):
        assert (await call(http, method, f"{url}{path}", {}))[0] in (404, 405)


async def test_the_imitations_loss_is_a_mean_over_random_batches(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,), reference_only=True, batch_seed=4) as svc,
        client(svc) as c,
    ):
        sampled = await c.create_session(
            PRESET, query_plus={"dataset": f"{TARGET}:validation", "batch_size": 7, "evaluation_batches": 3}
        )
        alpha, beta = vectors(1)
        losses = {(await c.evaluate(sampled, alpha, beta, cache=False)).loss for _ in range(4)}
        assert len(losses) > 1  # the same vectors score differently call to call
        whole = await c.create_session(PRESET, query_plus=WHOLE)
        names = list(repo.pool(TARGET, 5, 0))
        assert (await c.evaluate(whole, alpha, beta)).loss == pytest.approx(
            whole_loss(repo, names, alpha, beta), abs=1e-12
        )


async def test_concurrent_evaluations_of_one_session_are_silently_wrong_on_the_reference(
    reference: LocalService, repo: Repository, http: aiohttp.ClientSession
) -> None:
    body = {"preset_id": PRESET, "query_plus": WHOLE}
    sid = (await call(http, "POST", f"{reference.url}/v1/sessions", body))[2]["session_id"]
    url = f"{reference.url}/v1/sessions/{sid}/evaluate"
    names = list(repo.pool(TARGET, 5, 0))
    cands = [vectors(s) for s in range(16)]
    truth = [whole_loss(repo, names, a, b) for a, b in cands]
    answers: list[Any] = [None] * len(cands)

    async def one(i: int) -> None:
        a, b = cands[i]
        answers[i] = await call(http, "POST", url, {"alpha": a.tolist(), "beta": b.tolist(), "tag": "stage2"})

    async with anyio.create_task_group() as tg:
        for i in range(len(cands)):
            tg.start_soon(one, i)
    wrong = [
        i
        for i, (status, _, answer) in enumerate(answers)
        if status != 200 or abs(answer["loss"] - truth[i]) > 1e-9
    ]
    assert wrong  # evaluations sharing the tag's folder scored each other's adapters


# -- the client against it, one row of the table each -------------------------------------
async def test_presets_without_a_count_and_the_readme_flow(reference: LocalService) -> None:
    async with client(reference) as c:
        preset = next(p for p in await c.presets() if p.preset_id.endswith("/pool-5"))
        assert preset.adapter_count is None and preset.raw["path"].endswith(".json")
        target = preset.preset_id.split("/pool-")[0]
        validation = await c.create_session(preset.preset_id, query_plus={"dataset": f"{target}:validation"})
        assert validation.adapter_count == 5  # the count comes from the session
        assert validation.examples_per_evaluation == 15 * 20  # batch_size x evaluation_batches
        assert validation.tokens_per_evaluation == 300 * PER_EXAMPLE


def _example() -> Any:
    path = Path(__file__).resolve().parents[1] / "examples" / "service_search.py"
    spec = importlib.util.spec_from_file_location("service_search_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_readme_example_finds_a_merge_on_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    loss = await _example().main(max_evaluations=60, reference_only=True)
    assert math.isfinite(loss) and loss > 0
    assert "best validation loss" in capsys.readouterr().out


async def test_a_partial_query_plus_is_completed_before_it_is_sent(reference: LocalService) -> None:
    async with client(reference) as c:
        session = await c.create_session(
            PRESET, query_plus={"dataset": f"{TARGET}:held_out", "evaluation_batches": 2}
        )
        echoed = (await c.get_session(session))["query_plus"]
        assert (
            echoed
            == dict(session.query_plus)
            == {"dataset": f"{TARGET}:held_out", **REFERENCE_QUERY_PLUS_DEFAULTS, "evaluation_batches": 2}
        )
        assert session.examples_per_evaluation == 15 * 2
        before = reference.open_sessions
        with pytest.raises(ConfigError, match="'dataset'"):
            await c.create_session(PRESET, query_plus={"batch_size": 5})
        with pytest.raises(ConfigError, match=r"would ignore: \['examples'\]"):
            await c.create_session(PRESET, query_plus={**WHOLE, "examples": [{"prompt": "a", "label": "b"}]})
        assert reference.open_sessions == before  # nothing was sent
        capped = await c.create_session(PRESET, query_plus={**WHOLE, "cutoff_len": 8})
        assert capped.tokens_per_example == 8  # the service truncates every example to cutoff_len


async def test_deterministic_500s_are_retried_once_with_the_servers_message(reference: LocalService) -> None:
    async with Scheduler(retry=FAST) as scheduler, client(reference, scheduler=scheduler) as c:
        with pytest.raises(InvalidRequest, match=r"Internal Server Error.*answered 500 twice") as failed:
            await c.create_session("nope")
        assert failed.value.status == 500 and scheduler.metrics().requests == 2
        session = await c.create_session(PRESET, query_plus=WHOLE)
        with pytest.raises(ConfigError, match="5 entries"):  # a wrong length never leaves the client
            await c.evaluate(session, np.ones(4), np.ones(4))
        # A session that never scored: a 500 is a broken session, not a bad candidate.
        bad = await c.create_session(PRESET, query_plus={"dataset": "no-such-data"})
        sent = scheduler.metrics().requests
        with pytest.raises(InvalidRequest, match="answered 500 twice"):
            await c.evaluate(bad, np.ones(5), np.full(5, 0.2))
        assert scheduler.metrics().requests == sent + 2


async def test_a_non_finite_loss_ranks_its_candidate_worst(reference: LocalService, repo: Repository) -> None:
    async with (
        Scheduler(retry=FAST, budget=Budget(tokens=10**6)) as scheduler,
        client(reference, scheduler=scheduler) as c,
    ):
        session = await c.create_session(PRESET, query_plus=WHOLE)
        objective = ServiceObjective(c, session)
        cands = [Candidate(*vectors(s)) for s in range(3)]
        cands.insert(1, Candidate(np.ones(5), np.full(5, 1e300)))  # overflows: the reference answers 500
        losses = await objective(cands, EvaluationContext(Split.VALIDATION, "scale", 0, 0))
        names = list(repo.pool(TARGET, 5, 0))
        assert math.isnan(losses[1])
        finite = [losses[i] for i in (0, 2, 3)]
        assert finite == pytest.approx(
            [whole_loss(repo, names, c.alpha, c.beta) for c in (cands[0], *cands[2:])], abs=1e-12
        )
        assert scheduler.spent().tokens == 4 * 60 * PER_EXAMPLE  # charged once each, at its reservation


async def test_a_generation_without_a_concurrency_claim_gives_the_serial_losses(
    reference: LocalService, repo: Repository
) -> None:
    cands = [Candidate(*vectors(s)) for s in range(12)]
    context = EvaluationContext(Split.VALIDATION, "scale", 0, 0)
    async with client(reference) as c:
        session = await c.create_session(PRESET, query_plus=WHOLE)
        together = await ServiceObjective(c, session)(cands, context)  # the whole generation at once
        assert c.replicas[0].most_in_flight == 1  # ...sent one at a time
        serial = [(await c.evaluate(session, x.alpha, x.beta, cache=False)).loss for x in cands]
    assert together == serial
    names = list(repo.pool(TARGET, 5, 0))
    assert together == pytest.approx([whole_loss(repo, names, x.alpha, x.beta) for x in cands], abs=1e-12)
    async with client(reference, max_concurrent_evaluations=4) as c:  # the documented setting raises it
        session = await c.create_session(PRESET, query_plus=WHOLE)
        await ServiceObjective(c, session)(cands, context)
        assert c.replicas[0].most_in_flight > 1


async def test_the_embedded_service_declares_its_extensions_and_concurrency(repo: Repository) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as svc, client(svc) as c:
        health = await c.health()
        assert health["concurrent_evaluation"] == "safe" and "delete_session" in health["extensions"]
        session = await c.create_session(PRESET)
        cands = [Candidate(*vectors(s)) for s in range(12)]
        await ServiceObjective(c, session)(cands, EvaluationContext(Split.VALIDATION, "scale", 0, 0))
        assert c.replicas[0].most_in_flight > 1
        assert (await c.get_session(session))["n_examples"] == 60
    assert svc.open_sessions == 0  # the client deleted the session it created


async def test_without_usage_each_evaluation_is_charged_what_it_asks_for(reference: LocalService) -> None:
    async with (
        Scheduler(budget=Budget(tokens=3 * 300 * PER_EXAMPLE)) as scheduler,
        client(reference, scheduler=scheduler) as c,
    ):
        session = await c.create_session(PRESET, query_plus={"dataset": f"{TARGET}:validation"})
        for s in range(3):
            ev = await c.evaluate(session, *vectors(s))
            assert ev.usage.input_tokens == 15 * 20 * PER_EXAMPLE
        assert scheduler.spent().tokens == 3 * 300 * PER_EXAMPLE
        with pytest.raises(Exception, match="budget"):
            await c.evaluate(session, *vectors(9))


async def test_a_slow_evaluation_is_not_cut_by_the_schedulers_timeout(repo: Repository) -> None:
    slow = FaultConfig(latency=0.3)
    async with (
        LocalService(repo, pool_sizes=(5,), reference_only=True, faults=slow) as svc,
        Scheduler(timeout=0.05) as scheduler,  # sized for chat APIs
        client(svc, scheduler=scheduler) as c,
    ):
        assert c._http.timeout == 900.0  # fits an 8B evaluation (the first one loads the model)
        session = await c.create_session(PRESET, query_plus=WHOLE)
        assert math.isfinite((await c.evaluate(session, *vectors(0))).loss)


async def test_sessions_are_left_open_only_where_the_server_cannot_delete_them(
    reference: LocalService,
) -> None:
    with structlog.testing.capture_logs() as events:
        async with client(reference) as c:
            await c.create_session(PRESET, query_plus=WHOLE)
            assert not await c.delete_session(await c.create_session(PRESET, query_plus=WHOLE))
    assert reference.open_sessions == 2  # the reference never frees one
    assert [e["sessions"] for e in events if e["event"] == "sessions_left_open"] == [2]


async def test_get_session_and_the_services_own_search(repo: Repository, tmp_path: Path) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,), reference_only=True, output_dir=tmp_path, batch_seed=0) as svc,
        Scheduler(budget=Budget(tokens=10**9)) as scheduler,
        client(svc, scheduler=scheduler) as c,
    ):
        session = await c.create_session(PRESET, query_plus=WHOLE)
        described = await c.get_session(session)
        assert described["session_id"] == session.session_id and described["adapter_count"] == 5
        run = await c.optimize(session)
        assert len(run.alpha) == len(run.beta) == 5 and math.isfinite(run.best_loss)
        assert run.raw["stage1_evaluations"] == 400 and run.raw["stage2_evaluations"] == 800
        assert run.adapter_dir is not None and (tmp_path / run.adapter_dir).is_dir()
        assert (
            scheduler.spent().tokens == 1200 * 60 * PER_EXAMPLE
        )  # reserved and charged as 1,200 evaluations
        assert attrs.asdict(c.replicas[0])["failures"] == 0


async def test_materialize_answers_adapter_dir(reference: LocalService) -> None:
    async with client(reference) as c:
        session = await c.create_session(PRESET, query_plus=WHOLE)
        where = await c.materialize(session, np.ones(5), np.full(5, 0.2), tag="best")
        assert where.path == f"artifacts/{session.session_id}/artifacts/best" and where.adapter_name is None
        assert reference.output_dir is not None
        assert any((reference.output_dir / where.path).iterdir())  # the merged adapter, in that folder
