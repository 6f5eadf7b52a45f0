"""The engine's objective over a merge service (DESIGN 1.1): each candidate's loss from one evaluation.

async with MergeServiceClient(url, scheduler=scheduler) as client:
    validation = await client.create_session("ood:ner/news/pool-20")
    result = await EvoMerge(ServiceObjective(client, validation), validation.adapter_count).run()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._concurrency import Job, run_concurrently
from .._logs import get_logger
from ..engine._objective import Candidate, EvaluationContext, Split
from ..errors import BudgetExceeded, ConfigError
from ..providers import Usage
from ..service import MergeServiceClient, ServiceSession

__all__ = ["ServiceObjective"]

_log = get_logger("evomerge_sdk.service")


class ServiceObjective:
    """The engine's `Objective` over a merge service: each candidate's loss from one evaluation.

    A generation is handed to the client at once; the client runs as many at a time as each replica's
    session allows (one, on a service that does not declare `"concurrent_evaluation": "safe"`) and the
    scheduler bounds the rest; a failure is the SDK's own error. A candidate the service cannot score
    gets a NaN loss, which the search ranks worst and counts.
    `context.split` picks the session: `validation`, or `held_out` for early stopping (ConfigError if
    the search asks for a held-out split and there is none). With `context.batch_size` set, each
    candidate is scored on the generation's minibatch, when the server has the minibatch extension;
    otherwise on everything (logged once). A `BudgetExceeded` reaches the search, which stops cleanly.
    """

    def __init__(
        self,
        client: MergeServiceClient,
        validation: ServiceSession,
        held_out: ServiceSession | None = None,
    ) -> None:
        if not isinstance(client, MergeServiceClient):
            raise ConfigError(f"client must be a MergeServiceClient, got {type(client).__name__}")
        if not isinstance(validation, ServiceSession):
            raise ConfigError(
                f"the validation session must be a ServiceSession, got {type(validation).__name__}"
            )
        for session in (validation, held_out):
            if session is not None and not isinstance(session, ServiceSession):
                raise ConfigError(f"sessions must be ServiceSession objects, got {type(session).__name__}")
        if held_out is not None and held_out.adapter_count != validation.adapter_count:
            raise ConfigError("the validation and held-out sessions must have the same pool size")
        self.client = client
        self.validation = validation
        self.held_out = held_out
        self.evaluations = 0
        self.examples_scored = 0  # as the service reports them (`Evaluation.n_examples`); cost in examples
        self.cache_hits = 0
        self._told_full = False

    @property
    def n_models(self) -> int:
        """The pool size (entries of alpha and beta)."""
        return self.validation.adapter_count

    def _session(self, split: Split) -> ServiceSession:
        if split is Split.VALIDATION:
            return self.validation
        if self.held_out is None:
            raise ConfigError(
                "the search asked for a held-out split but the objective has no held-out session: pass "
                "held_out=..., or drop early stopping with attrs.evolve(config, early_stopping=None)"
            )
        return self.held_out

    async def check_affordable(self, candidates: int, context: EvaluationContext) -> None:
        """`BudgetExceeded` naming the amount needed, before any request, when the client's budget cannot
        pay for `candidates` evaluations in `context` at their worst case (see `Objective`)."""
        session = self._session(context.split)
        examples = None
        if context.batch_size is not None and session.minibatch and session.n_examples is not None:
            chosen = context.minibatch(session.n_examples)
            examples = None if chosen is None else chosen.tolist()
        each = self.client.worst_case(session, examples)
        self.client.scheduler.check_affordable(
            {self.client.model: Usage(each * candidates, 0)},
            f"one generation of the search ({candidates} candidates x up to {each:,} tokens each)",
        )

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext) -> list[float]:
        """Score every candidate on the context's split (and minibatch); losses in order."""
        session = self._session(context.split)
        examples = None
        if context.batch_size is not None:
            if session.minibatch and session.n_examples is not None:
                examples = context.minibatch(session.n_examples)
            elif not self._told_full:
                self._told_full = True
                _log.warning(
                    "minibatch_unavailable",
                    detail="the service cannot score a subset of examples; every evaluation scores all",
                    batch_size=context.batch_size,
                )
        losses = [math.nan] * len(candidates)

        def job(i: int, candidate: Candidate) -> Job:
            async def run() -> None:
                ev = await self.client.evaluate(
                    session, candidate.alpha, candidate.beta, examples=examples, tag=context.stage
                )
                losses[i] = ev.loss
                self.evaluations += 1
                self.examples_scored += ev.n_examples or 0
                self.cache_hits += int(ev.cached)

            return run

        # A spent budget lets the evaluations already paid for finish; any other failure ends the
        # generation, which is moot without it.
        await run_concurrently(
            [job(i, c) for i, c in enumerate(candidates)],
            keep_going=lambda exc: isinstance(exc, BudgetExceeded),
        )
        return losses
