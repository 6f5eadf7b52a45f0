"""The merge-service client and objective, against real embedded services (full and reference-only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import attrs
import numpy as np
import pytest

from evomerge_sdk.engine import Candidate, EvaluationContext, EvoMerge, Split, StopReason, preset
from evomerge_sdk.errors import AuthenticationError, BudgetExceeded, ConfigError, InvalidRequest
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.faults import FaultConfig, ServerLimits
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.objectives import ServiceObjective
from evomerge_sdk.scheduler import Budget, RetryPolicy, Scheduler
from evomerge_sdk.service import MergeServiceClient

PRESET = preset_id("ood:ner/news", 5)
TWO_STAGE = preset("two-stage")  # both stages, so the service sees each
assert TWO_STAGE.denoise is not None and TWO_STAGE.scale is not None
SMALL_SEARCH = attrs.evolve(
    TWO_STAGE,
    denoise=attrs.evolve(TWO_STAGE.denoise, max_evaluations=30, popsize=6),
    scale=attrs.evolve(TWO_STAGE.scale, max_evaluations=60, popsize=6),
)


def candidates(n: int, k: int, seed: int) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate(rng.random(n), rng.normal(0.0, 0.3, n)) for _ in range(k)]


class InProcess:
    """The same objective computed directly on the repository (the reference)."""

    def __init__(self, repo: Repository, names: Sequence[str]) -> None:
        self.repo, self.merger = repo, repo.merger(names)
        self.target = repo.target("ood:ner/news")

    async def __call__(self, cands: Sequence[Candidate], context: EvaluationContext) -> list[float]:
        examples = self.target.validation if context.split is Split.VALIDATION else self.target.holdout
        batch = context.minibatch(len(examples))
        if batch is not None:
            examples = examples.subset(batch)
        return [self.repo.evaluate(self.merger.merge(c.alpha, c.beta), examples).loss for c in cands]


@pytest.mark.anyio
async def test_search_through_the_service_equals_the_in_process_search(repo: Repository) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as svc, MergeServiceClient(svc.url) as client:
        validation = await client.create_session(PRESET)
        held_out = await client.create_session(PRESET, query_plus={"dataset": "ood:ner/news:held_out"})
        objective = ServiceObjective(client, validation, held_out)
        remote = await EvoMerge(objective, 5, SMALL_SEARCH).run()
        pool = list(validation.raw["adapters"])
    local = await EvoMerge(InProcess(repo, pool), 5, SMALL_SEARCH).run()
    assert remote.to_dict() == local.to_dict()
    assert objective.evaluations == remote.evaluations + remote.held_out_evaluations


@pytest.mark.anyio
async def test_cache_key_ignores_the_session_id_and_survives_a_restart(
    repo: Repository, tmp_path: Path
) -> None:
    cache = tmp_path / "responses.sqlite"
    cands = candidates(5, 6, 1)
    context = EvaluationContext(Split.VALIDATION, "t", 0, 0)
    async with LocalService(repo, pool_sizes=(5,)) as svc:
        async with (
            Scheduler(cache=cache) as scheduler,
            MergeServiceClient(svc.url, scheduler=scheduler) as client,
        ):
            first = await ServiceObjective(client, await client.create_session(PRESET))(cands, context)
            again = await ServiceObjective(client, await client.create_session(PRESET))(cands, context)
            assert again == first and scheduler.metrics().cache_hits == len(cands)
        served = svc.stats.served_requests
    assert served == len(cands)
    async with LocalService(repo, pool_sizes=(5,)) as svc:  # a new process, new session ids
        async with (
            Scheduler(cache=cache) as scheduler,
            MergeServiceClient(svc.url, scheduler=scheduler) as client,
        ):
            session = await client.create_session(PRESET)
            assert await ServiceObjective(client, session)(cands, context) == first
            other = await client.create_session(PRESET, query_plus={"dataset": "ood:ner/news:test"})
            assert await ServiceObjective(client, other)(cands[:1], context) != first[:1]
        assert svc.stats.served_requests == 1  # only the other dataset was asked


@pytest.mark.anyio
async def test_minibatch_fitness_scores_one_subset_per_generation(repo: Repository) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as svc, MergeServiceClient(svc.url) as client:
        session = await client.create_session(PRESET)
        assert session.minibatch and session.n_examples == 60
        context = EvaluationContext(Split.VALIDATION, "t", 3, seed=42, batch_size=10)
        cands = candidates(5, 4, 2)
        objective = ServiceObjective(client, session)
        losses = await objective(cands, context)
        idx = context.minibatch(60)
        assert idx is not None
        sub = repo.target("ood:ner/news").validation.subset(idx)
        names = list(session.raw["adapters"])
        assert losses == [repo.evaluate(repo.merge(names, c.alpha, c.beta), sub).loss for c in cands]
        spent = client.scheduler.metrics().tokens_in
        assert spent == len(cands) * int((sub.lengths + 1).sum())
        await objective(cands[:1], attrs.evolve(context, batch_size=None))
        assert objective.examples_scored == 4 * 10 + 60  # the demo plot's cost axis


@pytest.mark.anyio
async def test_budget_stops_the_search_cleanly(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,)) as svc,
        Scheduler(budget=Budget(tokens=30 * 720)) as scheduler,
        MergeServiceClient(svc.url, scheduler=scheduler, tokens_per_example=12) as client,
    ):
        session = await client.create_session(PRESET)
        assert session.tokens_per_evaluation == 720
        config = attrs.evolve(SMALL_SEARCH, early_stopping=None)
        result = await EvoMerge(ServiceObjective(client, session), 5, config).run()
        assert result.stop_reason is StopReason.BUDGET_EXCEEDED
        assert scheduler.spent().tokens <= 30 * 720
        with pytest.raises(BudgetExceeded):
            await client.evaluate(session, np.ones(5), np.full(5, 0.7))


@pytest.mark.anyio
async def test_faults_are_retried_and_change_no_result(repo: Repository) -> None:
    cands = candidates(5, 12, 5)
    context = EvaluationContext(Split.VALIDATION, "t", 0, 0)
    results = []
    for faults in (None, FaultConfig(seed=3, error_rate=0.25, drop_rate=0.15, malformed_rate=0.1)):
        async with (
            LocalService(repo, pool_sizes=(5,), faults=faults) as svc,
            Scheduler(retry=RetryPolicy(max_attempts=10, base_delay=0.001, max_delay=0.01)) as scheduler,
            MergeServiceClient(svc.url, scheduler=scheduler) as client,
        ):
            session = await client.create_session(PRESET)
            results.append(await ServiceObjective(client, session)(cands, context))
            if faults is not None:
                assert scheduler.metrics().retries > 0 and sum(svc.stats.injected.values()) > 0
    assert results[0] == results[1]


@pytest.mark.anyio
async def test_errors_are_typed_and_the_key_stays_secret(repo: Repository) -> None:
    key = "sk-service-secret-987"
    async with LocalService(repo, pool_sizes=(5,), api_key=key) as svc:
        async with MergeServiceClient(svc.url, api_key=key) as client:
            assert key not in repr(client)
            session = await client.create_session(PRESET)
            with pytest.raises(ConfigError, match="5 entries"):
                await client.evaluate(session, np.ones(4), np.ones(4))
            with pytest.raises(ConfigError, match=r"\[0, 1\]"):
                await client.evaluate(session, np.full(5, 2.0), np.ones(5))
            with pytest.raises(InvalidRequest, match="unknown preset_id") as unknown:
                await client.create_session("nope")
            assert unknown.value.status == 404
            gone = attrs.evolve(session, session_id="sess_gone", replica_ids=("sess_gone",))
            with pytest.raises(InvalidRequest, match="unknown session") as missing:
                await client.evaluate(gone, np.ones(5), np.zeros(5))
            assert missing.value.status == 404
            assert await client.delete_session(session)
        async with MergeServiceClient(svc.url, api_key="sk-wrong-key-000") as bad:
            with pytest.raises(AuthenticationError) as denied:
                await bad.presets()
            assert "sk-wrong-key-000" not in str(denied.value)
    with pytest.raises(ConfigError, match="base_url"):
        MergeServiceClient("localhost:8080")


@pytest.mark.anyio
async def test_complete_and_materialize(repo: Repository, tmp_path: Path) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,), output_dir=tmp_path) as svc,
        MergeServiceClient(svc.url) as client,
    ):
        presets = await client.presets()
        assert PRESET in {p.preset_id for p in presets}
        session = await client.create_session(PRESET)
        alpha, beta = np.full(5, 0.8), np.array([0.3, -0.2, 0.5, 0.1, 0.0])
        prompt = repo.target("ood:ner/news").test.prompts[2]
        completion = await client.complete(session, alpha, beta, prompt, top_logprobs=2)
        merged = repo.merge(list(session.raw["adapters"]), alpha, beta)
        want = repo.top_logprobs(merged, prompt, 2)
        assert completion.text == want[0][0] and list(completion.logprobs[0].top) == want
        again = await client.complete(session, alpha, beta, prompt, top_logprobs=2)
        assert again.cached and again.text == completion.text
        materialized = await client.materialize(session, alpha, beta, tag="x")
        assert Path(materialized.path).parent == tmp_path
        assert materialized.adapter_name is not None and materialized.adapter_name.startswith("merged-")


def test_objective_needs_a_held_out_session_for_early_stopping(repo: Repository) -> None:

    async def run() -> None:
        async with LocalService(repo, pool_sizes=(5,)) as svc, MergeServiceClient(svc.url) as client:
            objective = ServiceObjective(client, await client.create_session(PRESET))
            with pytest.raises(ConfigError, match="held-out"):
                await objective(candidates(5, 1, 0), EvaluationContext(Split.HELD_OUT, "t", 0, 0))

    anyio.run(run)


@pytest.mark.anyio
async def test_server_tpm_limit_is_honoured_without_paying_twice(repo: Repository) -> None:
    cands = candidates(5, 16, 6)
    context = EvaluationContext(Split.VALIDATION, "t", 0, 0)
    limits = ServerLimits(tpm=60 * 720 * 40, burst_seconds=0.05)  # 40 evaluations a second
    async with (
        LocalService(repo, pool_sizes=(5,), limits=limits) as svc,
        Scheduler(retry=RetryPolicy(max_attempts=30)) as scheduler,
        MergeServiceClient(svc.url, scheduler=scheduler) as client,
    ):
        losses = await ServiceObjective(client, await client.create_session(PRESET))(cands, context)
        assert svc.stats.served_requests == len(cands)  # a 429 is refused before any work
        assert scheduler.metrics().rate_limited == svc.stats.rate_limited
    assert losses == await InProcess(repo, svc.backend.presets[PRESET].adapters)(cands, context)  # type: ignore[union-attr]
