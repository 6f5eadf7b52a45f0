"""The two-stage search on a synthetic pool: quality, resume, checkpoints, budget, failure policies."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import pytest

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    PAPER,
    PRESETS,
    Candidate,
    EarlyStopping,
    EvaluationContext,
    EvoMerge,
    Progress,
    SearchConfig,
    SearchResult,
    Split,
    StageConfig,
    StopReason,
    ablations,
    merge_outputs,
    preset,
)
from evomerge_sdk.errors import BudgetExceeded, ConfigError, EvomergeError
from evomerge_sdk.testing import SyntheticPool

N = 12
# A smaller, quicker protocol for the mechanics tests.
SMALL = SearchConfig(
    name="small",
    denoise=StageConfig(start=1.0, sigma=0.2, lower=0.0, upper=1.0, popsize=8, max_evaluations=40),
    scale=StageConfig(start="1/N", sigma=0.1, lower=-1.5, upper=1.5, popsize=8, max_evaluations=64),
    early_stopping=EarlyStopping(patience=50),
    seed=4,
)


class Recorder:
    """Wraps an objective: logs every call, can fail or run out of budget at a given call."""

    def __init__(
        self, inner: SyntheticPool, *, fail_at: int | None = None, budget_at: int | None = None
    ) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.budget_at = budget_at
        self.log: list[tuple[EvaluationContext, list[Candidate]]] = []

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        call = len(self.log)
        if call == self.fail_at:
            raise RuntimeError("simulated crash")
        if call == self.budget_at:
            raise BudgetExceeded("budget spent", spent=call)
        self.log.append((context, list(candidates)))
        return await self.inner(candidates, context)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def pool() -> SyntheticPool:
    return SyntheticPool(N, seed=0)


def uniform(pool: SyntheticPool) -> float:
    return pool.loss(Candidate(np.ones(N), np.full(N, 1 / N)))


def test_synthetic_pool_is_the_output_space_merge(pool: SyntheticPool) -> None:
    rng = np.random.default_rng(1)
    c = Candidate(rng.uniform(0, 1, N), rng.uniform(-1.5, 1.5, N))
    expected = merge_outputs(pool.reference, pool.scores, c.alpha, c.beta)
    np.testing.assert_allclose(pool.merged_scores(c), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.anyio
async def test_paper_protocol_beats_uniform_and_needs_negative_betas(pool: SyntheticPool) -> None:
    result = await EvoMerge(pool, N, PAPER).run()
    assert result.method == "paper"
    assert result.loss < 0.5 * uniform(pool)
    assert pool.accuracy(result.candidate) > pool.accuracy(Candidate(np.ones(N), np.full(N, 1 / N))) + 0.3
    adverse = pool.skill_of == 3  # the skill the target counts against
    assert np.all(result.beta[adverse] < 0)
    without = await EvoMerge(pool, N, ablations(PAPER)["no_negative_betas"]).run()
    assert np.all(without.beta >= 0)
    assert without.loss > result.loss + 0.1
    # The loss reported is the objective's loss of the returned candidate; fitness adds the L1 penalty.
    assert result.loss == pool.loss(result.candidate)
    assert result.fitness == pytest.approx(result.loss + 0.05 * np.mean(np.abs(result.beta)))


@pytest.mark.anyio
async def test_two_stage_preset_reaches_a_lower_loss_than_the_paper(pool: SyntheticPool) -> None:
    # This toy pool is built so that denoising pays; the default has no stage 1 (it did not pay in the
    # embedded repository) and gets within a few percent here, for a tenth of the queries.
    paper = await EvoMerge(pool, N, PAPER).run()
    two = await EvoMerge(pool, N, preset("two-stage")).run()
    default = await EvoMerge(pool, N, DEFAULT).run()
    assert two.loss < paper.loss
    assert [s.name for s in two.stages] == ["denoise", "scale"]
    assert [s.name for s in default.stages] == ["scale"]
    assert default.loss < 1.03 * paper.loss < 0.5 * uniform(pool)


@pytest.mark.anyio
async def test_each_generation_is_one_objective_call_within_budget(pool: SyntheticPool) -> None:
    rec = Recorder(pool)
    result = await EvoMerge(rec, N, SMALL).run()
    validation = [(ctx, cands) for ctx, cands in rec.log if ctx.split is Split.VALIDATION]
    held_out = [(ctx, cands) for ctx, cands in rec.log if ctx.split is Split.HELD_OUT]
    assert all(len(c) == 8 for _, c in validation)
    assert all(len(c) == 1 for _, c in held_out)
    assert [s.evaluations for s in result.stages] == [40, 64]
    assert result.evaluations == 104 == sum(len(c) for _, c in validation)
    assert result.held_out_evaluations == len(held_out)
    assert [ctx.generation for ctx, _ in validation] == list(range(len(validation)))
    # A held-out call carries the generation and seed of the validation call it follows.
    for i, (ctx, _) in enumerate(rec.log):
        if ctx.split is Split.HELD_OUT:
            before = rec.log[i - 1][0]
            assert (ctx.generation, ctx.seed, ctx.stage) == (before.generation, before.seed, before.stage)
    assert len({ctx.seed for ctx, _ in validation}) == len(validation)
    # Stage 1 moves alpha with beta = 1/N; stage 2 moves beta with alpha fixed at stage 1's best.
    stage1 = [c for ctx, cs in validation if ctx.stage == "denoise" for c in cs]
    stage2 = [c for ctx, cs in validation if ctx.stage == "scale" for c in cs]
    assert all(np.array_equal(c.beta, np.full(N, 1 / N)) for c in stage1)
    assert all(np.array_equal(c.alpha, result.stages[0].candidate.alpha) for c in stage2)
    assert all(c.alpha.min() >= 0 and c.alpha.max() <= 1 for c in stage1)
    assert all(np.abs(c.beta).max() <= 1.5 for c in stage2)
    # History: one point per generation, best loss never increases within a stage.
    assert len(result.history) == len(validation)
    assert [h.evaluations for h in result.history] == list(range(8, 105, 8))


@pytest.mark.anyio
@pytest.mark.parametrize("fail_at", [2, 5, 9, 13])
async def test_resume_gives_identical_candidates_and_result(
    pool: SyntheticPool, tmp_path: Path, fail_at: int
) -> None:
    straight = Recorder(pool)
    expected = await EvoMerge(straight, N, SMALL).run()
    path = tmp_path / "run.json"
    crashing = Recorder(pool, fail_at=fail_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await EvoMerge(crashing, N, SMALL, checkpoint=path).run()
    assert path.exists()
    resumed_rec = Recorder(pool)
    resumed = await EvoMerge(resumed_rec, N, SMALL, checkpoint=path).run()
    assert resumed.to_dict() == expected.to_dict()
    # Calls of completed generations before the crash, then the resumed calls: the straight run exactly.
    done = len(straight.log) - len(resumed_rec.log)
    assert 0 < done <= len(crashing.log)
    assert crashing.log[:done] + resumed_rec.log == straight.log
    assert leftovers(tmp_path) == ["run.json"]  # no temp files left


@pytest.mark.anyio
async def test_finished_checkpoint_returns_the_result_without_evaluating(
    pool: SyntheticPool, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt.json"
    first = await EvoMerge(pool, N, SMALL, checkpoint=path).run()
    doc = json.loads(path.read_text())
    assert doc["finished"] is True
    rec = Recorder(pool)
    again = await EvoMerge(rec, N, SMALL, checkpoint=path).run()
    assert rec.log == [] and again.to_dict() == first.to_dict()


@pytest.mark.anyio
async def test_foreign_or_corrupt_checkpoints_are_refused(pool: SyntheticPool, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.json"
    with pytest.raises(RuntimeError):
        await EvoMerge(Recorder(pool, fail_at=5), N, SMALL, checkpoint=path).run()
    with pytest.raises(ConfigError, match="different search config"):
        await EvoMerge(pool, N, attrs.evolve(SMALL, seed=5), checkpoint=path).run()
    other = SyntheticPool(N + 1, seed=0)
    with pytest.raises(ConfigError, match="for 12 models"):
        await EvoMerge(other, N + 1, SMALL, checkpoint=path).run()
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="not readable JSON"):
        await EvoMerge(pool, N, SMALL, checkpoint=path).run()
    path.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ConfigError, match="not an evomerge-sdk search checkpoint"):
        await EvoMerge(pool, N, SMALL, checkpoint=path).run()
    for damage in ("drop es.ps", "stage 7", "fixed of 2"):
        doc = json.loads(text)
        if damage == "stage 7":
            doc["state"]["stage_index"] = 7
        elif damage == "fixed of 2":
            assert doc["state"]["fixed"] is not None
            doc["state"]["fixed"] = [0.5, 0.5]
        else:
            del doc["state"]["es"]["ps"]
        path.write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match=f"checkpoint {path} is damaged"):
            await EvoMerge(pool, N, SMALL, checkpoint=path).run()


@pytest.mark.anyio
async def test_an_unwritable_checkpoint_is_refused_before_any_evaluation(
    pool: SyntheticPool, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("x")
    for path, needle in (
        (tmp_path / "a-file" / "ckpt.json", "cannot create its folder"),
        (tmp_path, "directory"),
    ):
        rec = Recorder(pool)
        with pytest.raises(ConfigError, match=needle):
            await EvoMerge(rec, N, SMALL, checkpoint=path).run()
        assert rec.log == []


def test_objective_and_progress_callback_must_be_callable(pool: SyntheticPool) -> None:
    with pytest.raises(ConfigError, match="objective must be callable"):
        EvoMerge(None, N, SMALL)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_progress must be a function"):
        EvoMerge(pool, N, SMALL, on_progress=5)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("budget_at", [3, 8])
async def test_budget_exceeded_stops_cleanly_with_the_best_so_far(
    pool: SyntheticPool, budget_at: int
) -> None:
    rec = Recorder(pool, budget_at=budget_at)
    result = await EvoMerge(rec, N, SMALL).run()
    assert result.stop_reason is StopReason.BUDGET_EXCEEDED
    validation = [c for ctx, cs in rec.log if ctx.split is Split.VALIDATION for c in cs]
    assert result.evaluations == len(validation)
    assert result.loss == min(pool.loss(c) for c in validation if c == result.candidate)
    assert result.stages[-1].stop_reason is StopReason.BUDGET_EXCEEDED
    with pytest.raises(BudgetExceeded):
        await EvoMerge(Recorder(pool, budget_at=0), N, SMALL).run()


@pytest.mark.anyio
async def test_budget_stop_leaves_a_resumable_checkpoint(pool: SyntheticPool, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.json"
    expected = await EvoMerge(pool, N, SMALL).run()
    partial = await EvoMerge(Recorder(pool, budget_at=6), N, SMALL, checkpoint=path).run()
    assert partial.stop_reason is StopReason.BUDGET_EXCEEDED
    assert json.loads(path.read_text())["finished"] is False
    resumed = await EvoMerge(pool, N, SMALL, checkpoint=path).run()
    assert resumed.to_dict() == expected.to_dict()


class Flaky:
    """On validation: NaN for every third candidate, inf for candidates with a large beta."""

    def __init__(self, pool: SyntheticPool) -> None:
        self.pool = pool
        self.count = 0
        self.failed = 0

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        if context.split is Split.HELD_OUT:
            return [self.pool.loss(c, "held_out") for c in candidates]
        out = []
        for c in candidates:
            self.count += 1
            if self.count % 3 == 0:
                out.append(float("nan"))
            elif np.abs(c.beta).max() > 1.2:
                out.append(float("inf"))
            else:
                out.append(self.pool.loss(c))
        self.failed += sum(not np.isfinite(v) for v in out)
        return out


@pytest.mark.anyio
async def test_nan_and_inf_losses_rank_worst_and_are_counted(pool: SyntheticPool) -> None:
    flaky = Flaky(pool)
    result = await EvoMerge(flaky, N, SMALL).run()
    assert result.nonfinite_evaluations == flaky.failed >= result.evaluations // 3
    assert np.isfinite(result.loss) and result.loss == pool.loss(result.candidate)
    assert np.abs(result.beta).max() <= 1.2
    assert result.loss < uniform(pool)


@pytest.mark.anyio
async def test_objective_answer_is_checked(pool: SyntheticPool) -> None:
    async def all_nan(cands: Sequence[Candidate], ctx: EvaluationContext, /) -> list[float]:
        return [float("nan")] * len(cands)

    async def short(cands: Sequence[Candidate], ctx: EvaluationContext, /) -> list[float]:
        return [1.0] * (len(cands) - 1)

    async def words(cands: Sequence[Candidate], ctx: EvaluationContext, /) -> list[str]:
        return ["low"] * len(cands)

    with pytest.raises(EvomergeError, match="no finite loss"):
        await EvoMerge(all_nan, N, SMALL).run()
    with pytest.raises(ConfigError, match="7 losses for 8 candidates"):
        await EvoMerge(short, N, SMALL).run()
    with pytest.raises(ConfigError, match="must return numbers"):
        await EvoMerge(words, N, SMALL).run()  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_early_stopping_on_held_out(pool: SyntheticPool) -> None:
    calls: list[EvaluationContext] = []

    async def flat_held_out(cands: Sequence[Candidate], ctx: EvaluationContext, /) -> list[float]:
        calls.append(ctx)
        if ctx.split is Split.HELD_OUT:
            return [1.0] * len(cands)  # never improves
        return [pool.loss(c) for c in cands]

    config = attrs.evolve(SMALL, early_stopping=EarlyStopping(patience=2))
    result = await EvoMerge(flat_held_out, N, config).run()
    assert [s.stop_reason for s in result.stages] == [StopReason.EARLY_STOPPING] * 2
    assert [s.generations for s in result.stages] == [3, 3]
    assert result.held_out_loss == 1.0
    assert sum(c.split is Split.HELD_OUT for c in calls) == result.held_out_evaluations <= 6


@pytest.mark.anyio
async def test_progress_callback_sync_and_async(pool: SyntheticPool) -> None:
    seen: list[Progress] = []

    async def on_async(p: Progress) -> None:
        seen.append(p)

    result = await EvoMerge(pool, N, SMALL, on_progress=on_async).run()
    sync_seen: list[Progress] = []
    await EvoMerge(pool, N, SMALL, on_progress=sync_seen.append).run()
    assert len(seen) == len(sync_seen) == len(result.history) == 13
    assert [p.stage for p in seen] == ["denoise"] * 5 + ["scale"] * 8
    assert [p.evaluations for p in seen] == list(range(8, 105, 8))
    assert seen[-1].best_loss == result.loss and seen[-1].mean.shape == (N,)
    assert all(b.best_fitness <= a.best_fitness for a, b in itertools.pairwise(seen[5:]))


def test_result_json_round_trip(pool: SyntheticPool) -> None:
    import anyio

    result = anyio.run(EvoMerge(pool, N, SMALL).run)
    back = SearchResult.from_json(result.to_json())
    assert back.to_dict() == result.to_dict()
    assert back.candidate == result.candidate
    assert np.array_equal(back.alpha, result.alpha) and np.array_equal(back.beta, result.beta)


def test_presets_pin_the_paper_protocol() -> None:
    assert preset("paper") is PAPER and PRESETS["lorahub"] is LORAHUB
    d, s = PAPER.denoise, PAPER.scale
    assert d is not None and s is not None
    assert (d.start, d.sigma, d.lower, d.upper, d.popsize, d.max_evaluations, d.penalty) == (
        1.0, 0.05, 0.0, 1.0, 20, 400, 0.05,
    )  # fmt: skip
    assert (s.start, s.sigma, s.lower, s.upper, s.popsize, s.max_evaluations, s.penalty) == (
        "1/N", 0.05, -1.5, 1.5, 20, 800, 0.05,
    )  # fmt: skip
    assert d.diagonal is False and s.diagonal is False
    assert PAPER.early_stopping is not None
    abl = ablations(PAPER)
    assert abl["no_denoising"].denoise is None and abl["no_denoising"].scale == s
    assert abl["no_scaling"].scale is None and abl["no_scaling"].denoise == d
    neg = abl["no_negative_betas"].scale
    assert neg is not None and (neg.lower, neg.upper) == (0.0, 1.5)
    assert LORAHUB.denoise is None and LORAHUB.scale is not None and LORAHUB.scale.start == 0.0
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("best")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="lower < upper"):
        StageConfig(start=0.0, sigma=0.1, lower=1.0, upper=1.0, max_evaluations=10)
    with pytest.raises(ConfigError, match="popsize"):
        StageConfig(start=0.0, sigma=0.1, lower=0.0, upper=1.0, max_evaluations=10, popsize=0)
    with pytest.raises(ConfigError, match="sigma"):
        StageConfig(start=0.0, sigma=-1.0, lower=0.0, upper=1.0, max_evaluations=10)
    with pytest.raises(ConfigError, match="outside"):
        StageConfig(start=2.0, sigma=0.1, lower=0.0, upper=1.0, max_evaluations=10)
    with pytest.raises(ConfigError, match="max_evaluations"):
        StageConfig(start=0.0, sigma=0.1, lower=0.0, upper=1.0, max_evaluations=0)
    with pytest.raises(ConfigError, match="at least one stage"):
        SearchConfig(name="none", denoise=None, scale=None)
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(patience=0)
    pool = SyntheticPool(4, seed=0)
    with pytest.raises(ConfigError, match="n_models"):
        EvoMerge(pool, 0, SMALL)
    assert SMALL.scale is not None
    tight = attrs.evolve(SMALL, scale=attrs.evolve(SMALL.scale, lower=0.5))  # 1/N = 0.25 is outside
    with pytest.raises(ConfigError, match="outside the stage bounds"):
        EvoMerge(pool, 4, tight)
    with pytest.raises(ConfigError, match="3 entries but beta has 2"):
        Candidate(np.ones(3), np.ones(2))
    with pytest.raises(ConfigError, match="finite"):
        Candidate(np.ones(2), np.array([1.0, np.nan]))


def test_minibatch_is_a_deterministic_subset_shared_by_a_generation() -> None:
    from evomerge_sdk.engine import EvaluationContext, Split

    ctx = EvaluationContext(Split.VALIDATION, "stage2", 3, seed=1234, batch_size=60)
    first = ctx.minibatch(300)
    assert first is not None and first.size == 60 and len(set(first.tolist())) == 60
    again = ctx.minibatch(300)
    assert again is not None and np.array_equal(first, again)
    assert np.all(np.diff(first) > 0) and first.max() < 300
    assert EvaluationContext(Split.VALIDATION, "stage2", 3, seed=1234).minibatch(300) is None
    assert ctx.minibatch(50) is None  # a batch larger than the split scores all of it


# -- minibatch stages ---------------------------------------------------------------------------------
class MiniBatchPool:
    """The synthetic pool, scoring each call on the context's minibatch of its split (as a service would)."""

    def __init__(self, pool: SyntheticPool) -> None:
        self.pool = pool
        self.rows = {Split.VALIDATION: np.arange(200), Split.HELD_OUT: np.arange(200, 300)}  # its splits
        self.log: list[tuple[EvaluationContext, list[Candidate]]] = []

    def loss(self, candidate: Candidate, rows: np.ndarray) -> float:
        z = self.pool.merged_scores(candidate, rows)
        z = z - z.max(axis=-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return float(-log_p[np.arange(rows.size), self.pool.labels[rows]].mean())

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        self.log.append((context, list(candidates)))
        rows = self.rows[context.split]
        index = context.minibatch(rows.size)
        chosen = rows if index is None else rows[index]
        return [self.loss(c, chosen) for c in candidates]


MINI_SCALE = StageConfig(
    start="1/N", sigma=0.1, lower=-1.5, upper=1.5, popsize=8, max_evaluations=64, batch_size=40
)
MINI = SearchConfig(
    name="mini",
    denoise=StageConfig(
        start=1.0,
        sigma=0.2,
        lower=0.0,
        upper=1.0,
        popsize=8,
        max_evaluations=40,
        batch_size=40,
        rescore_every=2,
    ),
    scale=MINI_SCALE,
    seed=4,
)


@pytest.mark.anyio
async def test_minibatch_stage_scores_generations_on_a_batch_and_its_mean_on_the_whole_split(
    pool: SyntheticPool,
) -> None:
    obj = MiniBatchPool(pool)
    result = await EvoMerge(obj, N, MINI).run()
    whole = [(ctx, cs) for ctx, cs in obj.log if ctx.batch_size is None]
    batched = [(ctx, cs) for ctx, cs in obj.log if ctx.batch_size == 40]
    assert len(batched) == 5 + 8 and all(len(cs) == 8 for _, cs in batched)
    # Stage 1 re-scores its mean every 2nd generation and at its end (gen 5); stage 2 only at its end.
    assert [(ctx.stage, ctx.generation) for ctx, _ in whole] == [
        ("denoise", 1), ("denoise", 3), ("denoise", 4), ("scale", 12),
    ]  # fmt: skip
    assert all(len(cs) == 1 for _, cs in whole)
    # A fresh batch per generation, the same one for every candidate of it.
    seeds = [ctx.seed for ctx, _ in batched]
    assert len(set(seeds)) == len(seeds)
    # The incumbent is always a merge scored on the whole split: the loss reported is its exact loss.
    assert result.loss == obj.loss(result.candidate, obj.rows[Split.VALIDATION])
    assert result.candidate in [cs[0] for _, cs in whole] + [
        Candidate(result.stages[0].candidate.alpha, np.full(N, 1 / N))
    ]
    assert result.evaluations == 13 * 8 + 4 and [s.evaluations for s in result.stages] == [43, 65]
    uniform_loss = obj.loss(Candidate(np.ones(N), np.full(N, 1 / N)), obj.rows[Split.VALIDATION])
    assert result.loss < uniform_loss


@pytest.mark.anyio
async def test_minibatch_search_reaches_the_full_batch_loss_for_fewer_examples(pool: SyntheticPool) -> None:
    # The same number of generations on a fifth of the examples: close to the full-batch search.
    full = await EvoMerge(pool, N, attrs.evolve(PAPER, early_stopping=None)).run()
    assert PAPER.denoise is not None and PAPER.scale is not None
    mini_config = attrs.evolve(
        PAPER,
        early_stopping=None,
        denoise=attrs.evolve(PAPER.denoise, batch_size=40),
        scale=attrs.evolve(PAPER.scale, batch_size=40),
    )
    mini = await EvoMerge(MiniBatchPool(pool), N, mini_config).run()
    assert mini.loss < full.loss * 1.05
    assert mini.loss < 0.5 * uniform(pool)


@pytest.mark.anyio
@pytest.mark.parametrize("fail_at", [1, 3, 4, 9, 14])
async def test_minibatch_resume_gives_identical_calls_and_result(
    pool: SyntheticPool, tmp_path: Path, fail_at: int
) -> None:
    straight = MiniBatchPool(pool)
    expected = await EvoMerge(straight, N, MINI).run()

    class Crash(MiniBatchPool):
        async def __call__(self, cands: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
            if len(self.log) == fail_at:
                raise RuntimeError("simulated crash")
            return await super().__call__(cands, context)

    path = tmp_path / "run.json"
    crashing = Crash(pool)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await EvoMerge(crashing, N, MINI, checkpoint=path).run()
    resumed_obj = MiniBatchPool(pool)
    resumed = await EvoMerge(resumed_obj, N, MINI, checkpoint=path).run()
    assert resumed.to_dict() == expected.to_dict()
    done = len(straight.log) - len(resumed_obj.log)
    assert 0 <= done <= len(crashing.log)
    assert crashing.log[:done] + resumed_obj.log == straight.log


@pytest.mark.anyio
async def test_early_stopping_on_a_minibatch_stage_checks_the_rescored_mean(pool: SyntheticPool) -> None:
    calls: list[EvaluationContext] = []
    inner = MiniBatchPool(pool)

    async def flat_held_out(cands: Sequence[Candidate], ctx: EvaluationContext, /) -> list[float]:
        calls.append(ctx)
        if ctx.split is Split.HELD_OUT:
            return [1.0] * len(cands)  # never improves
        return await inner(cands, ctx)

    config = attrs.evolve(
        MINI,
        denoise=None,
        scale=attrs.evolve(MINI_SCALE, rescore_every=2, max_evaluations=400),
        early_stopping=EarlyStopping(patience=4),
    )
    result = await EvoMerge(flat_held_out, N, config).run()
    assert result.stop_reason is StopReason.EARLY_STOPPING
    # Held-out improves once (the first incumbent), then 4 generations without: stop after generation 6.
    assert result.stages[0].generations == 6
    assert result.held_out_evaluations == sum(c.split is Split.HELD_OUT for c in calls) >= 1


def test_sigma_scaling_and_minibatch_config_errors() -> None:
    stage = StageConfig(start=0.0, sigma=0.2, lower=-1.0, upper=1.0, max_evaluations=40, sigma_scaling="sqrt")
    assert stage.sigma_value(20) == pytest.approx(0.2)
    assert stage.sigma_value(80) == pytest.approx(0.1)
    assert attrs.evolve(stage, sigma_scaling="none").sigma_value(80) == 0.2
    with pytest.raises(ConfigError, match="sigma_scaling"):
        attrs.evolve(stage, sigma_scaling="linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        attrs.evolve(stage, batch_size=0)
    with pytest.raises(ConfigError, match="rescore_every"):
        attrs.evolve(stage, rescore_every=-1)
    with pytest.raises(ConfigError, match="needs rescore_every in"):
        attrs.evolve(MINI, early_stopping=EarlyStopping(patience=5))
    assert attrs.evolve(MINI, early_stopping=EarlyStopping(patience=2), scale=None).denoise is not None
    assert SearchConfig.from_dict(json.loads(json.dumps(MINI.to_dict()))) == MINI


@pytest.mark.anyio
async def test_progress_carries_the_incumbent_and_the_merge_at_the_cma_mean(pool: SyntheticPool) -> None:
    seen: list[Progress] = []
    result = await EvoMerge(MiniBatchPool(pool), N, MINI, on_progress=seen.append).run()
    denoise = [p for p in seen if p.stage == "denoise"]
    scale = [p for p in seen if p.stage == "scale"]
    assert denoise[0].candidate is None  # nothing scored on the whole split yet
    for p in seen:
        assert p.mean_candidate is not None
        searched = p.mean_candidate.alpha if p.stage == "denoise" else p.mean_candidate.beta
        np.testing.assert_array_equal(searched, p.mean)
    for p in scale:
        assert p.mean_candidate is not None and p.candidate is not None
        np.testing.assert_array_equal(p.mean_candidate.alpha, result.stages[0].candidate.alpha)
        assert p.best_loss == obj_loss(pool, p.candidate)
    assert all(np.array_equal(p.mean_candidate.beta, np.full(N, 1 / N)) for p in denoise if p.mean_candidate)


def obj_loss(pool: SyntheticPool, candidate: Candidate) -> float:
    return MiniBatchPool(pool).loss(candidate, np.arange(200))
