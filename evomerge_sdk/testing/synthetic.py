"""A seeded toy pool for the output-space merge, to exercise the search without any model or service.

Every example has `n_options` answers. A set of latent skills each favours one answer per example; the
target task is a sparse, signed mix of skills (one skill counts against it), and each model in the pool
knows one skill plus dense noise. So merging helps, uniform merging is poor (distractor skills and the
adverse skill enter with positive weight), denoising pays (the noise is dense, the skill is one entry
per example), and the best merge needs a negative beta. The loss is the mean cross-entropy of the merged
scores of DESIGN 1.2 against the target's answers, on the split the context asks for.

It is a test bed for the engine, not a language model; `merged_scores` equals `merge_outputs` up to
float rounding (it sums in another order, from precomputed sparsified task vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .._types import FloatArray
from ..engine._objective import Candidate, EvaluationContext, Split
from ..engine._operators import keep_count, magnitude_order, sparsify
from ..errors import ConfigError

__all__ = ["SyntheticPool"]


class SyntheticPool:
    """A toy output-space pool; awaiting it scores candidates (it is an `Objective`).

    Models are assigned skills round-robin; the target mixes the skills with `target_weights` (the rest
    are distractors, weight 0). Examples are split into validation, held-out and test, in that order.
    """

    def __init__(
        self,
        n_models: int = 12,
        *,
        n_skills: int = 6,
        target_weights: Sequence[float] = (2.0, 1.5, 1.0, -1.5),
        n_options: int = 8,
        splits: tuple[int, int, int] = (200, 100, 200),
        noise: float = 0.6,
        seed: int = 0,
    ) -> None:
        if n_models < 1 or n_skills < 1 or n_options < 2:
            raise ConfigError("need n_models >= 1, n_skills >= 1 and n_options >= 2")
        if len(target_weights) > n_skills:
            raise ConfigError(f"{len(target_weights)} target weights for only {n_skills} skills")
        if min(splits) < 1:
            raise ConfigError(f"every split needs at least one example, got {splits}")
        rng = np.random.default_rng(seed)
        n_examples = sum(splits)
        self.n_models = n_models
        self.n_options = n_options
        self.skill_of = np.arange(n_models) % n_skills
        weights = np.zeros(n_skills)
        weights[: len(target_weights)] = target_weights
        self.target_weights = weights
        skills = np.zeros((n_skills, n_examples, n_options))
        picks = rng.integers(0, n_options, size=(n_skills, n_examples))
        np.put_along_axis(skills, picks[..., None], 2.0, axis=-1)
        self.reference: FloatArray = rng.standard_normal((n_examples, n_options))
        target = self.reference + np.tensordot(weights, skills, axes=1)
        self.labels = np.argmax(target, axis=-1)
        self.scores: FloatArray = (
            self.reference
            + skills[self.skill_of]
            + noise * rng.standard_normal((n_models, n_examples, n_options))
        )
        deltas = self.scores - self.reference
        order = magnitude_order(deltas, axis=-1)
        # levels[i, k] = model i's task vector with the k largest entries of each example kept.
        self._levels = np.stack(
            [
                np.stack(
                    [
                        sparsify(deltas[i], k / n_options, axis=-1, order=order[i])
                        for k in range(n_options + 1)
                    ]
                )
                for i in range(n_models)
            ]
        )
        bounds = np.cumsum((0, *splits))
        self._rows = {
            "validation": np.arange(bounds[0], bounds[1]),
            "held_out": np.arange(bounds[1], bounds[2]),
            "test": np.arange(bounds[2], bounds[3]),
        }
        self.calls: list[tuple[EvaluationContext, int]] = []

    def oracle(self) -> Candidate:
        """The intended merge: a target skill's models share its weight; alpha keeps one answer."""
        counts = np.bincount(self.skill_of, minlength=self.target_weights.size)
        beta = self.target_weights[self.skill_of] / counts[self.skill_of]
        return Candidate(alpha=np.full(self.n_models, 1.0 / self.n_options), beta=beta)

    def merged_scores(self, candidate: Candidate, rows: ArrayLike | None = None) -> FloatArray:
        """z_r + sum_i beta_i S(z_i - z_r, alpha_i) on the given example rows (all by default)."""
        if candidate.n != self.n_models:
            raise ConfigError(f"candidate has {candidate.n} models, the pool {self.n_models}")
        idx = slice(None) if rows is None else np.asarray(rows)
        counts = [keep_count(a, self.n_options) for a in candidate.alpha]
        picked = self._levels[np.arange(self.n_models), counts][:, idx]
        out: FloatArray = self.reference[idx] + np.tensordot(candidate.beta, picked, axes=1)
        return out

    def loss(self, candidate: Candidate, split: str = "validation", subset: ArrayLike | None = None) -> float:
        """Mean cross-entropy of the merged scores against the target answers on `split` (or on the
        `subset` of its examples, by position)."""
        rows = self._rows[split] if subset is None else self._rows[split][np.asarray(subset)]
        z = self.merged_scores(candidate, rows)
        z = z - z.max(axis=-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return float(-log_p[np.arange(rows.size), self.labels[rows]].mean())

    def accuracy(self, candidate: Candidate, split: str = "test") -> float:
        """Share of examples whose top merged score is the target answer."""
        rows = self._rows[split]
        return float((self.merged_scores(candidate, rows).argmax(axis=-1) == self.labels[rows]).mean())

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        """Score `candidates` on the context's split (its minibatch, if any, as a service would);
        records (context, count) in `calls`."""
        self.calls.append((context, len(candidates)))
        split = "held_out" if context.split is Split.HELD_OUT else "validation"
        subset = context.minibatch(self._rows[split].size)
        return [self.loss(c, split, subset) for c in candidates]
