"""The engine's `Objective` on the embedded repository, in process: no HTTP, exact usage accounting.

`LocalObjective(repository, pool, target)` scores each candidate (alpha, beta) as the merge service of
DESIGN 1.1 would: merge the pool's LoRA pairs, then the mean cross-entropy of the gold answer on the split
the context names (`validation` drives a search, `held_out` decides early stopping) and, when the context
asks for minibatch fitness, only on `context.minibatch(n)` of its examples. So a benchmark runs a search
in milliseconds per generation and still counts what a real service would bill:

* `queries`: examples scored (one candidate on one example is one query; the paper's protocol spends
  1,200 evaluations x 300 examples = 360,000 per search);
* `tokens`: the prompt tokens of those examples plus one answer token each, as the embedded server's
  `usage` counts them.

A per-example cache remembers every (candidate, split, example) loss it computed: asking again for a
candidate on examples it has already scored costs nothing for those examples (re-scoring a minibatch
winner on the whole split pays only for the examples it has not seen). `max_queries` is a hard budget:
a call that would pass it raises `BudgetExceeded` before scoring anything, which the search turns into a
clean stop with the best so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import numpy as np

from .._checks import is_int
from .._types import FloatArray, IndexArray
from ..engine._objective import Candidate, EvaluationContext, Split
from ..errors import BudgetExceeded, ConfigError
from ..local.merge import PoolMerger
from ..local.model import ModelWeights
from ..local.repository import Repository, Target
from ..local.tasks import Examples
from ..objectives.metrics import Metrics

__all__ = ["LocalObjective", "ObjectiveUsage"]

SplitName = Literal["validation", "held_out", "test"]


@attrs.frozen
class ObjectiveUsage:
    """What a `LocalObjective` has spent: examples scored (`queries`), their tokens, the candidates it
    was asked to score (`evaluations`) and the examples it served from its cache (`cached`)."""

    queries: int = 0
    tokens: int = 0
    evaluations: int = 0
    cached: int = 0


class LocalObjective:
    """Scores merges of `pool` (adapter names) on `target`'s validation or held-out split; see module doc.

    `cache_size` bounds how many (candidate, split) entries the per-example cache keeps (oldest dropped
    first; 0 disables it).
    """

    def __init__(
        self,
        repository: Repository,
        pool: Sequence[str],
        target: str | Target,
        *,
        max_queries: int | None = None,
        cache_size: int = 20_000,
    ) -> None:
        if max_queries is not None and (not is_int(max_queries) or max_queries < 1):
            raise ConfigError(f"max_queries must be None or a positive integer, got {max_queries!r}")
        if not is_int(cache_size) or cache_size < 0:
            raise ConfigError(f"cache_size must be a non-negative integer, got {cache_size!r}")
        self.repository = repository
        self.target = repository.target(target)
        self.pool = tuple(pool)
        self.merger: PoolMerger = repository.merger(self.pool)
        self.max_queries = max_queries
        self.cache_size = cache_size
        self._splits: dict[Split, Examples] = {
            Split.VALIDATION: self.target.validation,
            Split.HELD_OUT: self.target.holdout,
        }
        # Tokens of one example: its prompt plus the one answer token it is scored on.
        self._example_tokens = {s: (e.lengths + 1).astype(np.int64) for s, e in self._splits.items()}
        self._cache: dict[tuple[Split, bytes], FloatArray] = {}
        self._usage = ObjectiveUsage()

    @property
    def n_models(self) -> int:
        """Number of adapters in the pool (the length of alpha and beta)."""
        return len(self.pool)

    @property
    def usage(self) -> ObjectiveUsage:
        """Everything spent so far."""
        return self._usage

    @property
    def queries(self) -> int:
        """Examples scored so far (cache hits excluded)."""
        return self._usage.queries

    @property
    def tokens(self) -> int:
        """Prompt + answer tokens of the examples scored so far."""
        return self._usage.tokens

    def split_size(self, split: Split) -> int:
        """How many examples a split holds."""
        return len(self._splits[split])

    def weights(self, candidate: Candidate) -> ModelWeights:
        """The merged model of a candidate."""
        self._check(candidate)
        return self.merger.merge(candidate.alpha, candidate.beta)

    def metrics(self, candidate: Candidate, split: SplitName = "test") -> Metrics:
        """Loss, accuracy and macro-F1 of a candidate on a whole split, for reporting: not counted."""
        splits = {
            "validation": self.target.validation,
            "held_out": self.target.holdout,
            "test": self.target.test,
        }
        if split not in splits:
            raise ConfigError(f"split must be validation, held_out or test, got {split!r}")
        return self.repository.evaluate(self.weights(candidate), splits[split])

    def _check(self, candidate: Candidate) -> None:
        if not isinstance(candidate, Candidate):
            raise ConfigError(f"expected a Candidate, got {type(candidate).__name__}")
        if candidate.n != self.n_models:
            raise ConfigError(f"candidate has {candidate.n} models, the pool {self.n_models}")

    def _example_losses(self, candidate: Candidate, examples: Examples, index: IndexArray) -> FloatArray:
        """Cross-entropy of the gold answer of each example at `index`."""
        logprobs = self.repository.next_token_logprobs_ids(
            self.weights(candidate), examples.ids[index], examples.lengths[index]
        )
        out: FloatArray = -logprobs[np.arange(index.size), examples.labels[index]]
        return out

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        """Mean cross-entropy of each candidate on the context's split (and minibatch), in order."""
        if context.split not in self._splits:
            raise ConfigError(f"LocalObjective scores validation or held_out, not {context.split!r}")
        for c in candidates:
            self._check(c)
        examples = self._splits[context.split]
        tokens = self._example_tokens[context.split]
        n = len(examples)
        chosen = context.minibatch(n)
        index = np.arange(n) if chosen is None else np.asarray(chosen, dtype=np.intp)
        # Which examples each candidate still needs, and what they cost, before anything is scored.
        rows: list[FloatArray | None] = []
        missing: list[IndexArray] = []
        for c in candidates:
            row = self._cache.get((context.split, c.key())) if self.cache_size else None
            rows.append(row)
            missing.append(index if row is None else index[np.isnan(row[index])])
        queries = sum(int(m.size) for m in missing)
        if self.max_queries is not None and self._usage.queries + queries > self.max_queries:
            raise BudgetExceeded(
                f"scoring {queries} more examples would pass the budget of {self.max_queries} queries",
                spent=self._usage,
            )
        out = []
        for c, row, need in zip(candidates, rows, missing, strict=True):
            if row is None:
                row = np.full(n, np.nan)
            if need.size:
                row[need] = self._example_losses(c, examples, need)
            if self.cache_size:
                self._remember((context.split, c.key()), row)
            out.append(float(row[index].mean()))
        self._usage = ObjectiveUsage(
            queries=self._usage.queries + queries,
            tokens=self._usage.tokens + int(sum(int(tokens[m].sum()) for m in missing)),
            evaluations=self._usage.evaluations + len(candidates),
            cached=self._usage.cached + len(candidates) * index.size - queries,
        )
        return out

    def _remember(self, key: tuple[Split, bytes], row: FloatArray) -> None:
        self._cache.pop(key, None)
        self._cache[key] = row
        while len(self._cache) > self.cache_size:
            del self._cache[next(iter(self._cache))]
