"""Output-space merging (DESIGN 1.2) as an objective: score each model once, then search for free.

For a task with a finite answer set (labels, choices), every model gives per example a score vector over
the options. `collect_scores` asks each model once per example through the `Scheduler` (so the answers
are cached, budgeted and retried) and returns a `ScoreTable` (models x examples x options):

* providers with log-probabilities (`supports_logprobs`, e.g. OpenAI-compatible servers): one request
  per (model, example) with `max_tokens=1`, `logprobs=True`, `top_logprobs=20`; an option's score is the
  log-probability of its first token among the listed alternatives (exact match after stripping
  whitespace and case-folding, else a listed token that is a prefix of the option; several matching
  tokens are summed in probability). An option the API did not list gets the floor
  `min(lowest listed logprob, log(unlisted mass / unlisted options))`: never above what the API showed,
  and the probability the top list leaves over, shared among the missing options.
* providers without them (Anthropic): `samples` answers at `temperature > 0`, each cached under its own
  sample index; an option's score is its smoothed vote frequency, log((votes + s) / (k + s * options)).

`OutputSpaceObjective` is the engine's `Objective` on such tables: with a reference r (a named base
model, or the mean of the pool) it merges z_m = z_r + sum_i beta_i S(z_i - z_r, alpha_i)
(`operators.merge_outputs`) and returns the mean cross-entropy of the gold option under the merged scores
renormalised over the answer set (log-softmax over the options). It never queries anything: the whole
search runs on the cached tensor, so its query cost does not grow with generations.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np
from attrs.validators import and_
from numpy.typing import ArrayLike, NDArray

from .._checks import is_int, is_number
from .._concurrency import Job, run_concurrently
from .._types import FloatArray, IntArray
from .._validators import must, positive_int
from ..engine._objective import Candidate, EvaluationContext, Split
from ..engine._operators import keep_count, magnitude_order
from ..errors import BadResponse, BudgetExceeded, ConfigError
from ..providers import ChatRequest, Completion, Message, Provider, Usage, as_messages
from ..scheduler import Outcome, Scheduler, cache_key, chat_cache_key
from .metrics import accuracy, cross_entropy, macro_f1

__all__ = [
    "MEAN_REFERENCE",
    "AnswerSet",
    "LabelledExamples",
    "OutputScores",
    "OutputSpaceObjective",
    "Providers",
    "ScoreTable",
    "ScoringCallback",
    "ScoringConfig",
    "ScoringProgress",
    "collect_scores",
    "plan_scoring",
    "provider_for",
    "score_completion",
    "scoring_request",
    "vote_scores",
]


MEAN_REFERENCE = "mean"
"""The reference name that means "the mean of the pool's scores" instead of a named model."""

_BATCH = 256  # requests started at once, across all models (the scheduler bounds what is in flight)


def _normalise(text: str) -> str:
    return text.strip().casefold()


def _str_tuple(values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"options must be a sequence of strings, got {values!r:.60}")
    return tuple(values)


def _distinct_options(_: object, __: attrs.Attribute[Any], options: tuple[str, ...]) -> None:
    """Two or more non-blank options that stay apart after normalising, so every answer maps to one."""
    if len(options) < 2:
        raise ConfigError(f"an answer set needs at least two options, got {list(options)}")
    keys = [_normalise(o) if isinstance(o, str) else "" for o in options]
    if not all(keys):
        raise ConfigError("every option must be a non-blank string")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"options must differ after stripping and case-folding: {list(options)}")


@attrs.frozen
class AnswerSet:
    """The finite set of answers (labels, choices) a task is scored on, in a fixed order."""

    options: tuple[str, ...] = attrs.field(converter=_str_tuple, validator=_distinct_options)

    def __len__(self) -> int:
        return len(self.options)

    def index(self, answer: str) -> int:
        """The option index of a gold answer (ConfigError if it is not an option)."""
        if not isinstance(answer, str):
            raise ConfigError(f"a gold answer must be a string, got {answer!r:.60}")
        key = _normalise(answer)
        for i, option in enumerate(self.options):
            if _normalise(option) == key:
                return i
        raise ConfigError(f"answer {answer!r} is not in the answer set {list(self.options)}")

    def match_text(self, text: str) -> int | None:
        """The option a free-text answer names: the whole answer, else its first word; None if neither."""
        key = _normalise(text)
        words = key.split()
        first = words[0].strip(".,;:!?\"'()") if words else ""
        for candidate in (key, first):
            for i, option in enumerate(self.options):
                if _normalise(option) == candidate:
                    return i
        return None

    def token_scores(self, listed: Sequence[tuple[str, float]]) -> FloatArray:
        """Each option's log-probability from one position's listed tokens (see the module doc)."""
        if not listed:
            raise BadResponse("the completion lists no token log-probabilities")
        # The chosen token usually appears among the alternatives too: count each listed token once.
        unique = dict(listed)
        values = np.array(list(unique.values()), dtype=np.float64)
        keys = [_normalise(t) for t in unique]
        out = np.full(len(self.options), -np.inf)
        found = np.zeros(len(self.options), dtype=bool)
        for i, option in enumerate(self.options):
            name = _normalise(option)
            exact = [v for k, v in zip(keys, values, strict=True) if k == name]
            hits = exact or [v for k, v in zip(keys, values, strict=True) if k and name.startswith(k)]
            if hits:
                out[i] = float(np.logaddexp.reduce(np.array(hits)))
                found[i] = True
        missing = int((~found).sum())
        if missing:
            listed_mass = min(float(np.exp(np.logaddexp.reduce(values))), 1.0)
            rest = math.log(max(1.0 - listed_mass, 1e-12) / missing)
            out[~found] = min(float(values.min()), rest)
        return out


@attrs.frozen(eq=False)
class LabelledExamples:
    """Prompts with gold answers from an `AnswerSet`; `labels` are the gold option indices."""

    prompts: tuple[tuple[Message, ...], ...] = attrs.field(
        validator=must(bool, "labelled examples need at least one example")
    )
    answers: tuple[str, ...]
    answer_set: AnswerSet
    labels: IntArray = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        """Cross-field: one answer per prompt; derives `labels`, each answer's option index."""
        if len(self.prompts) != len(self.answers):
            raise ConfigError(f"need one answer per prompt, got {len(self.answers)} for {len(self.prompts)}")
        labels = np.array([self.answer_set.index(a) for a in self.answers], dtype=np.int64)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def of(
        cls,
        prompts: Sequence[str | Sequence[Message] | Sequence[Mapping[str, str]]],
        answers: Sequence[str],
        options: AnswerSet | Sequence[str],
    ) -> LabelledExamples:
        """Build from text prompts (or chats) and gold answers."""
        for name, value in (("prompts", prompts), ("answers", answers)):
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ConfigError(f"{name} must be a sequence, got {value!r:.60}")
        if not all(isinstance(p, (str, Sequence)) for p in prompts):
            raise ConfigError("every prompt must be a string or a chat (a list of messages)")
        answer_set = options if isinstance(options, AnswerSet) else AnswerSet(options)
        return cls(tuple(as_messages(p) for p in prompts), tuple(answers), answer_set)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: slice | Sequence[int] | IntArray) -> LabelledExamples:
        """The examples at `index`."""
        sel = np.arange(len(self))[index]
        return LabelledExamples(
            tuple(self.prompts[i] for i in sel), tuple(self.answers[i] for i in sel), self.answer_set
        )


_optional_str = must(
    lambda v: v is None or isinstance(v, str), "{name} must be a string or None, got {value!r}"
)


@attrs.frozen
class ScoringConfig:
    """How a model is asked for its scores.

    `method`: "auto" (log-probabilities when the provider has them, votes otherwise), "logprobs" or
    "votes". `top_logprobs` alternatives per request (at most 20). Votes: `samples` answers at
    `temperature`, `max_tokens` each, add-`smoothing` counts; `seed_field` names a body field that gets a
    per-sample seed ("auto": "seed" for OpenAI-compatible servers, none for others), since a server that
    derives its randomness from the request would otherwise answer every sample alike. `system` is an
    optional system message put before every prompt (an instruction to answer with one option).
    """

    method: Literal["auto", "logprobs", "votes"] = attrs.field(
        default="auto",
        validator=must(
            lambda v: v in ("auto", "logprobs", "votes"),
            "method must be 'auto', 'logprobs' or 'votes', got {value!r}",
        ),
    )
    top_logprobs: int = attrs.field(
        default=20,
        validator=and_(positive_int, must(lambda v: v <= 20, "top_logprobs must be at most 20, got {value}")),
    )
    samples: int = attrs.field(default=8, validator=positive_int)
    temperature: float = attrs.field(
        default=1.0,
        validator=must(
            lambda v: is_number(v) and v > 0, "temperature (for voting) must be > 0, got {value!r}"
        ),
    )
    max_tokens: int = attrs.field(default=4, validator=positive_int)
    smoothing: float = attrs.field(
        default=1.0,
        validator=must(
            lambda v: is_number(v) and v > 0,
            "smoothing must be > 0 (zero votes would score -inf), got {value!r}",
        ),
    )
    seed_field: str | None = attrs.field(default="auto", validator=_optional_str)
    seed: int = attrs.field(default=0, validator=must(is_int, "seed must be an integer, got {value!r}"))
    system: str | None = attrs.field(default=None, validator=_optional_str)

    def method_for(self, provider: Provider) -> Literal["logprobs", "votes"]:
        """The method used for `provider`."""
        if self.method != "auto":
            return self.method
        return "logprobs" if getattr(provider, "supports_logprobs", False) else "votes"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoringConfig:
        """The inverse of `to_dict`."""
        try:
            return cls(**dict(data))
        except TypeError as exc:  # an unknown field
            raise ConfigError(f"scoring config: {exc}") from None


def scoring_request(
    model: str, prompt: Sequence[Message], config: ScoringConfig, method: Literal["logprobs", "votes"]
) -> ChatRequest:
    """The chat request that scores one prompt (without the per-sample seed of a vote)."""
    messages = tuple(prompt)
    if config.system is not None:
        messages = (Message("system", config.system), *messages)
    if method == "logprobs":
        return ChatRequest(
            model=model,
            messages=messages,
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=config.top_logprobs,
        )
    return ChatRequest(
        model=model, messages=messages, max_tokens=config.max_tokens, temperature=config.temperature
    )


def score_completion(completion: Completion, answer_set: AnswerSet) -> FloatArray:
    """Option scores from a logprobs completion: its first position's chosen token and alternatives."""
    if not completion.logprobs:
        raise BadResponse(
            f"model {completion.model!r} returned no logprobs: score it with ScoringConfig(method='votes')"
        )
    first = completion.logprobs[0]
    return answer_set.token_scores(((first.token, first.logprob), *first.top))


def vote_scores(counts: ArrayLike, samples: int, smoothing: float) -> FloatArray:
    """Smoothed log vote frequencies: log((count + s) / (samples + s * options))."""
    c = np.asarray(counts, dtype=np.float64)
    out: FloatArray = np.log((c + smoothing) / (samples + smoothing * c.shape[-1]))
    return out


def _seed_field(config: ScoringConfig, provider: Provider) -> str | None:
    if config.seed_field == "auto":
        return "seed" if getattr(provider, "name", "") == "openai" else None
    return config.seed_field


async def _vote(
    scheduler: Scheduler, provider: Provider, request: ChatRequest, sample: int, field: str | None
) -> tuple[str, Usage, bool]:
    if field is not None:
        request = attrs.evolve(request, extra={**request.extra, field: sample})
    key = cache_key("evomerge/objectives/vote/v1", chat_cache_key(provider.name, request), str(sample))

    async def send() -> Outcome:
        completion = await provider.complete(request)
        return Outcome(completion.text, completion.usage, completion.rate_limits)

    reserve = Usage(await scheduler.tokens.acount_request(request), request.max_tokens)
    result = await scheduler.call(send, model=request.model, reserve=reserve, cache_key=key, label="vote")
    return str(result.value), result.usage, result.cached


async def score_prompt(
    scheduler: Scheduler,
    provider: Provider,
    model: str,
    prompt: Sequence[Message],
    answer_set: AnswerSet,
    config: ScoringConfig,
) -> tuple[FloatArray, Usage, int]:
    """One model's option scores for one prompt, the usage paid and the requests answered from cache."""
    method = config.method_for(provider)
    request = scoring_request(model, prompt, config, method)
    if method == "logprobs":
        # Whether the answer came from the cache: the scheduler's counter before and after would race
        # with concurrent calls, so compare keys instead.
        cache = scheduler.cache
        key = chat_cache_key(provider.name, request)
        hit = cache is not None and (cache.get(key) is not None or cache.on_disk(key))
        completion = await scheduler.complete(provider, request)
        return score_completion(completion, answer_set), completion.usage, int(hit)
    counts = np.zeros(len(answer_set))
    total = Usage()
    cached = 0
    field = _seed_field(config, provider)
    for sample in _samples(config):
        text, usage, hit = await _vote(scheduler, provider, request, sample, field)
        total = total + usage
        cached += int(hit)
        choice = answer_set.match_text(text)
        if choice is not None:
            counts[choice] += 1
    return vote_scores(counts, config.samples, config.smoothing), total, cached


@attrs.frozen(eq=False)
class ScoreTable:
    """Every model's option scores on a set of examples: `scores[m, e, k]` for model `models[m]`.

    `usage` is what collecting them cost (cached answers included, as the scheduler reports them);
    `requests` counts the requests made for them and `cached` those answered from the cache.
    """

    models: tuple[str, ...] = attrs.field(
        validator=must(lambda v: len(set(v)) == len(v), "a score table must not name a model twice")
    )
    scores: FloatArray
    examples: LabelledExamples
    usage: Usage = attrs.field(factory=Usage)
    requests: int = 0
    cached: int = 0

    def __attrs_post_init__(self) -> None:
        """Cross-field invariant: one score per model, example and option."""
        expected = (len(self.models), len(self.examples), len(self.examples.answer_set))
        if self.scores.shape != expected:
            raise ConfigError(f"scores have shape {self.scores.shape}, expected {expected}")

    def of(self, model: str) -> FloatArray:
        """One model's scores (examples x options)."""
        try:
            row: FloatArray = self.scores[self.models.index(model)]
            return row
        except ValueError:
            raise ConfigError(f"model {model!r} is not in this table ({list(self.models)})") from None

    def select(self, pool: Sequence[str], reference: str = MEAN_REFERENCE) -> OutputScores:
        """The pool's scores and the reference (a model of the table, or `MEAN_REFERENCE`)."""
        if isinstance(pool, str) or not pool:
            raise ConfigError("pool must be a non-empty sequence of model names")
        z = np.stack([self.of(m) for m in pool])
        r = z.mean(axis=0) if reference == MEAN_REFERENCE else self.of(reference)
        return OutputScores(z, r, self.examples.labels)


Providers = Provider | Mapping[str, Provider]
"""One provider for every model, or a provider per model name (a pool spread over several APIs)."""


def provider_for(providers: Providers, model: str) -> Provider:
    """The provider that serves `model`."""
    if isinstance(providers, Mapping):
        try:
            found = providers[model]
        except KeyError:
            raise ConfigError(f"no provider given for model {model!r}") from None
    else:
        found = providers
    if not callable(getattr(found, "complete", None)):
        raise ConfigError(f"the provider for {model!r} is not a Provider (no complete method): {found!r:.60}")
    return found


@attrs.frozen
class ScoringProgress:
    """Where a scoring pass stands: prompts scored (`done` of `total` model x example pairs), how many
    came from the cache, and the tokens paid so far."""

    done: int
    total: int
    cached: int
    tokens: int


ScoringCallback = Callable[[ScoringProgress], Any]
"""`collect_scores`' progress callback: a plain or an async function of `ScoringProgress`."""


async def plan_scoring(
    scheduler: Scheduler,
    provider: Providers,
    models: Sequence[str],
    examples: LabelledExamples,
    config: ScoringConfig | None = None,
) -> dict[str, Usage]:
    """The worst-case usage per model of the requests a scoring pass would send (cached answers excluded):
    what `collect_scores` checks against the budget before sending anything."""
    config = ScoringConfig() if config is None else config
    plan: dict[str, Usage] = {}
    cache = scheduler.cache
    for model in models:
        chosen = provider_for(provider, model)
        method = config.method_for(chosen)
        field = _seed_field(config, chosen)
        total = Usage()
        for prompt in examples.prompts:
            request = scoring_request(model, prompt, config, method)
            key = chat_cache_key(chosen.name, request)
            if method == "logprobs":
                keys = [key]
            else:
                seeded = [
                    attrs.evolve(request, extra={**request.extra, field: sample}) if field else request
                    for sample in _samples(config)
                ]
                keys = [
                    cache_key("evomerge/objectives/vote/v1", chat_cache_key(chosen.name, r), str(sample))
                    for r, sample in zip(seeded, _samples(config), strict=True)
                ]
            unpaid = sum(1 for k in keys if cache is None or (cache.get(k) is None and not cache.on_disk(k)))
            if unpaid:
                worst = Usage(await scheduler.tokens.acount_request(request), request.max_tokens)
                total = total + Usage(worst.input_tokens * unpaid, worst.output_tokens * unpaid)
        if total.input_tokens or total.output_tokens:
            plan[model] = total
    return plan


def _samples(config: ScoringConfig) -> range:
    """The seeds of a vote's samples (per scoring seed, so two seeds never share a sample)."""
    seed0 = config.seed * 1_000_003
    return range(seed0, seed0 + config.samples)


async def collect_scores(
    scheduler: Scheduler,
    provider: Providers,
    models: Sequence[str],
    examples: LabelledExamples,
    config: ScoringConfig | None = None,
    *,
    on_progress: ScoringCallback | None = None,
) -> ScoreTable:
    """Ask every model once per example (see the module doc) and return the `ScoreTable`.

    `provider` may map model names to providers: each model is scored the way its provider allows
    (log-probabilities, or votes for a provider without them), so one pool can span several APIs.

    Money before queries: with a budget, the pass's worst case (`plan_scoring`) is checked first, and a
    budget that cannot pay for it is a `BudgetExceeded` saying how much is needed, before any request.
    Should the budget still run out (another user of the scheduler), the answers already paid for are
    kept in the scheduler's cache and the `BudgetExceeded` says so: a rerun pays only for the rest.
    Failures are the SDK's own errors (the first one; never an ExceptionGroup). `on_progress` (plain or
    async) receives a `ScoringProgress` after every prompt scored.
    """
    config = ScoringConfig() if config is None else config
    if not isinstance(scheduler, Scheduler):
        raise ConfigError(f"scheduler must be a Scheduler, got {type(scheduler).__name__}")
    if not isinstance(config, ScoringConfig):
        raise ConfigError(f"config must be a ScoringConfig or None, got {type(config).__name__}")
    if not isinstance(examples, LabelledExamples):
        raise ConfigError(
            f"examples must be LabelledExamples (see LabelledExamples.of), got {type(examples).__name__}"
        )
    if isinstance(models, str) or not isinstance(models, Sequence) or not models:
        raise ConfigError("models must be a non-empty sequence of model names")
    if not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"every model name must be a non-empty string, got {list(models)!r:.80}")
    if len(set(models)) != len(models):
        raise ConfigError("models must not name a model twice")
    if on_progress is not None and not callable(on_progress):
        raise ConfigError(f"on_progress must be a function or None, got {on_progress!r:.60}")
    chosen = [provider_for(provider, m) for m in models]
    if scheduler.budget is not None:
        plan = await plan_scoring(scheduler, provider, models, examples, config)
        pairs = f"{len(models)} models x {len(examples)} prompts"
        scheduler.check_affordable(plan, f"scoring {pairs}")
    scores = np.zeros((len(models), len(examples), len(examples.answer_set)))
    usages: list[Usage] = []
    cached = 0
    tokens = 0
    jobs = [(m, e) for m in range(len(models)) for e in range(len(examples))]

    def job(m: int, e: int) -> Job:
        async def run() -> None:
            nonlocal cached, tokens
            row, usage, hits = await score_prompt(
                scheduler, chosen[m], models[m], examples.prompts[e], examples.answer_set, config
            )
            scores[m, e] = row
            usages.append(usage)
            cached += hits
            tokens += usage.input_tokens + usage.output_tokens
            if on_progress is not None:
                shown = on_progress(ScoringProgress(len(usages), len(jobs), cached, tokens))
                if inspect.isawaitable(shown):
                    await shown

        return run

    try:
        for start in range(0, len(jobs), _BATCH):
            await run_concurrently(
                [job(m, e) for m, e in jobs[start : start + _BATCH]],
                keep_going=lambda exc: isinstance(exc, BudgetExceeded),
            )
    except BudgetExceeded as exc:
        raise BudgetExceeded(
            f"the scoring pass ran out of budget after {len(usages):,} of {len(jobs):,} prompts; the "
            f"answers paid for are in the scheduler's cache, so a rerun with a larger budget pays only "
            f"for the rest ({exc})",
            spent=exc.spent,
        ) from exc
    total = Usage()
    for u in usages:
        total = total + u
    per_model = [1 if config.method_for(p) == "logprobs" else config.samples for p in chosen]
    return ScoreTable(
        models=tuple(models),
        scores=scores,
        examples=examples,
        usage=total,
        requests=sum(per_model) * len(examples),
        cached=cached,
    )


def _floats(value: ArrayLike) -> FloatArray:
    return np.asarray(value, dtype=np.float64)


def _ints(value: ArrayLike) -> IntArray:
    return np.asarray(value, dtype=np.int64)


@attrs.frozen(eq=False)
class OutputScores:
    """One split's cached scores: the pool's (models x examples x options), the reference's
    (examples x options) and the gold option per example."""

    pool: FloatArray = attrs.field(converter=_floats)
    reference: FloatArray = attrs.field(converter=_floats)
    labels: IntArray = attrs.field(converter=_ints)
    _deltas: FloatArray = attrs.field(init=False, repr=False)
    _ranks: NDArray[np.intp] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants (shapes, labels within the options); derives the deltas and their ranks."""
        if self.pool.ndim != 3 or self.pool.shape[1:] != self.reference.shape:
            raise ConfigError(
                f"pool scores {self.pool.shape} must be (models, examples, options) matching the "
                f"reference {self.reference.shape}"
            )
        if self.labels.shape != (self.pool.shape[1],):
            raise ConfigError(f"need one label per example, got {self.labels.shape}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.pool.shape[2]):
            raise ConfigError("labels must be option indices")
        if not (np.all(np.isfinite(self.pool)) and np.all(np.isfinite(self.reference))):
            raise ConfigError("scores must be finite (use a floor for unlisted options)")
        # The task vectors d_i = z_i - z_r and their magnitude ranks never change during a search: computed
        # once, each candidate's merge is a mask and a weighted sum (the same result as merge_outputs).
        deltas = self.pool - self.reference[None]
        order = magnitude_order(deltas, axis=-1)
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(deltas.shape[-1])[None, None, :], axis=-1)
        object.__setattr__(self, "_deltas", deltas)
        object.__setattr__(self, "_ranks", ranks)

    @property
    def n_models(self) -> int:
        """Models in the pool."""
        return int(self.pool.shape[0])

    def merged(self, alpha: ArrayLike, beta: ArrayLike, index: IntArray | None = None) -> FloatArray:
        """The merged scores z_m (examples x options), on the examples at `index` (all when None)."""
        a = np.asarray(alpha, dtype=np.float64)
        b = np.asarray(beta, dtype=np.float64)
        n, options = self.pool.shape[0], self.pool.shape[2]
        if a.shape != (n,) or b.shape != (n,) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            raise ConfigError(f"alpha and beta must be {n} finite numbers each")
        deltas, ranks = self._deltas, self._ranks
        reference = self.reference
        if index is not None:
            deltas, ranks, reference = deltas[:, index], ranks[:, index], reference[index]
        keep = np.array([keep_count(float(k), options) for k in a])
        weights = np.where(ranks < keep[:, None, None], b[:, None, None], 0.0)
        merged: FloatArray = reference + np.einsum("nek,nek->ek", weights, deltas)
        return merged

    def metrics(self, alpha: ArrayLike, beta: ArrayLike) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of the merge on every example."""
        z = self.merged(alpha, beta)
        return {
            "loss": cross_entropy(z, self.labels),
            "accuracy": accuracy(z, self.labels),
            "macro_f1": macro_f1(z, self.labels),
        }


class OutputSpaceObjective:
    """The engine's `Objective` on cached output scores (see the module doc): no query, ever.

    `context.split` picks `validation` or `held_out` (ConfigError when the search asks for a held-out
    split that was not given); `context.batch_size` scores the generation's common minibatch.
    `evaluations` counts candidates scored.
    """

    def __init__(self, validation: OutputScores, held_out: OutputScores | None = None) -> None:
        if not isinstance(validation, OutputScores):
            raise ConfigError(
                f"validation must be OutputScores (see collect_scores), got {type(validation).__name__}"
            )
        for s in (validation, held_out):
            if s is not None and not isinstance(s, OutputScores):
                raise ConfigError(f"expected OutputScores, got {type(s).__name__}")
        if held_out is not None and held_out.pool.shape[::2] != validation.pool.shape[::2]:
            raise ConfigError("validation and held-out scores must have the same models and options")
        self.validation = validation
        self.held_out = held_out
        self.evaluations = 0

    @property
    def n_models(self) -> int:
        """Models in the pool (entries of alpha and beta)."""
        return self.validation.n_models

    def _split(self, split: Split) -> OutputScores:
        if split is Split.VALIDATION:
            return self.validation
        if self.held_out is None:
            raise ConfigError(
                "the search asked for a held-out split but the objective has none: pass held_out=..., or "
                "drop early stopping with attrs.evolve(config, early_stopping=None)"
            )
        return self.held_out

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext) -> list[float]:
        """The loss of every candidate on the context's split (and minibatch), in order."""
        data = self._split(context.split)
        index = context.minibatch(data.labels.size)
        labels = data.labels if index is None else data.labels[index]
        losses = []
        for c in candidates:
            if c.n != data.n_models:
                raise ConfigError(f"a candidate has {c.n} entries for a pool of {data.n_models} models")
            losses.append(cross_entropy(data.merged(c.alpha, c.beta, index), labels))
        self.evaluations += len(candidates)
        return losses

    def prune(self, candidate: Candidate, tolerance: float = 0.005) -> Candidate:
        """`candidate` with models dropped (alpha = beta = 0) while the validation loss stays within
        `tolerance` (relative) of the original: a merged model never queries a dropped model when it
        serves. Greedy, smallest |beta| first; costs no query (cached scores)."""
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ConfigError(f"tolerance must be >= 0, got {tolerance!r}")
        data = self.validation
        limit = cross_entropy(data.merged(candidate.alpha, candidate.beta), data.labels) * (1 + tolerance)
        alpha, beta = candidate.alpha.copy(), candidate.beta.copy()
        for i in np.argsort(np.abs(beta), kind="stable"):
            if alpha[i] == 0 or beta[i] == 0:
                continue
            trial_a, trial_b = alpha.copy(), beta.copy()
            trial_a[i] = trial_b[i] = 0.0
            if cross_entropy(data.merged(trial_a, trial_b), data.labels) <= limit:
                alpha, beta = trial_a, trial_b
        return Candidate(alpha, beta)
