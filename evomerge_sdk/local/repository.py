"""The embedded model repository: a numpy base model, LoRA adapters trained from a seed, merge targets.

Generative story (the world itself is described in `evomerge_sdk.local.tasks`):

* A base model (`evomerge_sdk.local.model`) is pre-trained on a generic mixture, so it has features for
  every word but knows none of the repository's tasks.
* The hub holds one LoRA adapter (rank 8, on W1, W2, W3) for every grid task (type x domain), trained
  with the hub's recipe: PEFT defaults with one fixed seed, so all of them start from the same A (with
  `RepositoryConfig(lora_init="distinct")`, each from its own seed, as real LoRA training gives it). Each
  saw its own sample of 64-256 prompts, so they differ in quality too.
* Harmful adapters: for some grid tasks the hub's only adapter was trained with inverted labels (the
  least likely label: a labelling bug); nothing in its name says so. Each is tied to a default target:
  another task of the target's domain (a conflicting annotation of the same corpus), never a target's
  own task. Adding one with positive weight hurts; subtracting it (negative beta) is the only way to use
  what it learned, and out-of-domain the target domain's knowledge is scarce.
* Irrelevant adapters (`tr/bio`) answer a different question with content words, and come from another
  contributor's recipe (their own A initialisation), so they are useless for parameter merging.
* Targets are grid tasks with their own validation (300), held-out (100) and test (1000) prompts. An
  out-of-domain (`ood`) target's specialist adapter is never in its pools: only merging what related
  adapters know (same type: the type's reading; same domain: the domain's reading; other tasks: the
  analogy's negative part; harmful: negated) can do better than the best single adapter. An in-domain
  (`id`) target's specialist is always in its pools, with distractors; the target task is low-resource
  (its adapters saw the smallest training set), so what the hub knows can improve on it.

`Repository.pool(target, size, seed)` draws stratified pools (some same-domain, same-type, harmful and
irrelevant adapters, the rest at random), of any size up to the whole hub (5, 20 and 100 are typical).

Builds are deterministic: the same config gives bitwise the same weights on one machine, and are cached
as `.npz` under `$EVOMERGE_CACHE_DIR`, else `$XDG_CACHE_HOME/evomerge-sdk`, else `~/.cache/evomerge-sdk`,
keyed by a hash of the config and `FORMAT_VERSION`, written atomically and readable by the user only. A
cache file that does not load or does not match is rebuilt.

How the three mechanisms of Evo-Merging fare here (`benchmarks/local.py`, out-of-domain targets, 3 seeds):
scaling is what makes merging work at all (beta = 1/N is worse than the best single adapter); negative
betas pay a few points (the harmful adapters); sparsification of A (denoising) does not move test accuracy
beyond noise. Every hub adapter's A is the shared initialisation plus what training added, and a merge of
them tolerates that whole; magnitude sparsification only removes small entries, so it cannot separate a
distractor whose A is large. The world was not tuned to hide or show this; the embedded-repository section
of `benchmarks/RESULTS.md` lists the variants tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
from attrs.validators import and_
from numpy.typing import ArrayLike

from .._checks import is_int
from .._io import write_npz_atomic
from .._types import Float32Array, FloatArray, IntArray
from .._validators import integer, must, non_negative_int, number, positive_int
from ..errors import ConfigError
from ..objectives.metrics import Metrics, score_logprobs
from ._blas import single_threaded_blas
from .merge import PoolMerger
from .model import LORA_MATRICES, LoraAdapter, ModelWeights, bag_embeddings, forward_logits, log_softmax
from .tasks import Examples, Task, World, build_world
from .training import AdapterBatch, pretrain_base, train_adapters, uniform_init

__all__ = [
    "FORMAT_VERSION",
    "AdapterInfo",
    "Repository",
    "RepositoryConfig",
    "Target",
    "build_repository",
    "default_cache_dir",
]


FORMAT_VERSION = 5
"""Bumped whenever the generative code changes what a config builds; part of the cache key."""

Role = Literal["specialist", "same-domain", "same-type", "other-task", "harmful", "irrelevant"]
_BASE_FIELDS = ("embedding", "w1", "b1", "w2", "b2", "w3", "b3")


def _lora_init(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("shared", "distinct"):
        raise ConfigError(f"{attribute.name} must be 'shared' or 'distinct', got {value!r}")


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _sizes(_: object, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    if not value or any(not is_int(v) or v < 1 for v in value):
        raise ConfigError(f"{attribute.name} must be a non-empty tuple of positive integers, got {value!r}")


_POSITIVE = number()
_NON_NEGATIVE = number(strict=False)


@attrs.frozen
class RepositoryConfig:
    """Everything a repository build depends on. The defaults build the 110-adapter hub (5 types x 20
    domains, 10 of them harmful, plus 10 irrelevant adapters).

    World: types x domains grid, label set, words, latent feature sizes, prompt shape, how much of each
    task is specific to it, label noise (temperature). Network: embedding, hidden width, LoRA rank and
    lora_alpha. Training: pre-training and adapter recipes. Hub: harmful and irrelevant adapter counts.
    Targets: how many out-of-domain and in-domain targets, and their split sizes. `lora_init`: "shared"
    (every hub adapter starts from one A, the hub's recipe) or "distinct" (each adapter's A from its own
    seed, as PEFT's default training gives it, so the merge's cross terms B_i A_j are interference).
    """

    seed: int = attrs.field(default=0, validator=integer)
    n_types: int = attrs.field(default=5, validator=positive_int)
    n_domains: int = attrs.field(default=20, validator=positive_int)
    n_labels: int = attrs.field(
        default=8,
        validator=and_(positive_int, must(lambda v: v >= 2, "the answer set needs at least two labels")),
    )
    general_words: int = attrs.field(default=80, validator=positive_int)
    domain_words: int = attrs.field(default=10, validator=positive_int)
    general_features: int = attrs.field(default=4, validator=positive_int)
    domain_features: int = attrs.field(default=4, validator=positive_int)
    pretrain_tasks: int = attrs.field(default=12, validator=positive_int)
    general_per_prompt: int = attrs.field(default=5, validator=positive_int)
    domain_per_prompt: int = attrs.field(default=4, validator=positive_int)
    task_specific_scale: float = attrs.field(default=0.3, validator=_NON_NEGATIVE)
    temperature: float = attrs.field(default=0.35, validator=_POSITIVE)
    embed_dim: int = attrs.field(default=32, validator=positive_int)
    hidden_dim: int = attrs.field(default=64, validator=positive_int)
    rank: int = attrs.field(default=8, validator=positive_int)
    lora_alpha: float = attrs.field(default=16.0, validator=_POSITIVE)
    pretrain_examples: int = attrs.field(default=60_000, validator=positive_int)
    pretrain_steps: int = attrs.field(default=600, validator=positive_int)
    pretrain_batch: int = attrs.field(default=512, validator=positive_int)
    pretrain_lr: float = attrs.field(default=0.01, validator=_POSITIVE)
    harmful: int = attrs.field(default=10, validator=non_negative_int)
    irrelevant: int = attrs.field(default=10, validator=non_negative_int)
    train_sizes: tuple[int, ...] = attrs.field(
        default=(64, 96, 128, 192, 256), converter=_int_tuple, validator=_sizes
    )
    train_steps: int = attrs.field(default=150, validator=positive_int)
    train_batch: int = attrs.field(default=8, validator=positive_int)
    train_lr: float = attrs.field(default=0.01, validator=_POSITIVE)
    lora_init: Literal["shared", "distinct"] = attrs.field(default="shared", validator=_lora_init)
    ood_targets: int = attrs.field(default=4, validator=non_negative_int)
    id_targets: int = attrs.field(default=4, validator=non_negative_int)
    validation_size: int = attrs.field(default=300, validator=positive_int)
    holdout_size: int = attrs.field(default=100, validator=positive_int)
    test_size: int = attrs.field(default=1000, validator=positive_int)

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants: targets fit the domains, harmful adapters the types, prompts the words."""
        n_targets = self.ood_targets + self.id_targets
        if n_targets < 1:
            raise ConfigError("a repository needs at least one target")
        if n_targets > self.n_domains:
            raise ConfigError(f"{n_targets} targets need as many domains, only {self.n_domains}")
        if self.n_types < 2 and self.harmful:
            raise ConfigError("harmful adapters need at least two task types")
        if self.general_per_prompt > self.general_words or self.domain_per_prompt > self.domain_words:
            raise ConfigError("a prompt cannot hold more distinct words than the vocabulary has")

    @classmethod
    def small(cls, seed: int = 0) -> RepositoryConfig:
        """A tiny repository (3 types x 4 domains, 2 of them harmful, + 2 irrelevant adapters); it builds
        in a fraction of a second."""
        return cls(
            seed=seed,
            n_types=3,
            n_domains=4,
            general_words=24,
            domain_words=6,
            pretrain_tasks=4,
            embed_dim=16,
            hidden_dim=24,
            rank=4,
            lora_alpha=8.0,
            pretrain_examples=4000,
            pretrain_steps=150,
            pretrain_batch=128,
            harmful=2,
            irrelevant=2,
            train_sizes=[32, 64],
            train_steps=40,
            ood_targets=2,
            id_targets=2,
            validation_size=60,
            holdout_size=20,
            test_size=100,
        )

    @property
    def scale(self) -> float:
        """LoRA scale s = lora_alpha / r."""
        return float(self.lora_alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(self).items()}

    def key(self) -> str:
        """Hash of the config and the format version: the cache key."""
        blob = json.dumps({"format": FORMAT_VERSION, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@attrs.frozen
class AdapterInfo:
    """An adapter of the hub: its name, what it is (`task`, `harmful`, `irrelevant`), the task it was
    trained on (an inverted one for harmful adapters) and how many training prompts it saw."""

    name: str
    kind: Literal["task", "harmful", "irrelevant"]
    task: Task
    train_examples: int


@attrs.frozen(eq=False)
class Target:
    """A merge target: a grid task with validation, held-out and test prompts.

    `kind` is `ood` (the specialist never enters its pools) or `id` (it always does).
    """

    name: str
    kind: Literal["ood", "id"]
    task: Task
    specialist: str
    validation: Examples
    holdout: Examples
    test: Examples


def default_cache_dir() -> Path:
    """`$EVOMERGE_CACHE_DIR`, else `$XDG_CACHE_HOME/evomerge-sdk`, else `~/.cache/evomerge-sdk`."""
    explicit = os.environ.get("EVOMERGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "evomerge-sdk"


class Repository:
    """A built repository: base model, adapters, targets; merges and evaluates (see module doc)."""

    def __init__(
        self,
        config: RepositoryConfig,
        world: World,
        base: ModelWeights,
        adapters: Sequence[AdapterInfo],
        a_stacks: Sequence[Float32Array],
        b_stacks: Sequence[Float32Array],
        targets: Sequence[Target],
    ) -> None:
        self.config = config
        self.world = world
        self.base = base
        self.adapters = tuple(adapters)
        self._a = [np.asarray(a, dtype=np.float64) for a in a_stacks]
        self._b = [np.asarray(b, dtype=np.float64) for b in b_stacks]
        self._index = {a.name: i for i, a in enumerate(self.adapters)}
        self._targets = tuple(targets)
        self._target_index = {t.name: t for t in self._targets}

    # -- lookup ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The word-level tokenizer (`evomerge_sdk.local.tokenizer.Tokenizer`)."""
        return self.world.tokenizer

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter's name, in repository order."""
        return tuple(a.name for a in self.adapters)

    def adapter(self, name: str) -> AdapterInfo:
        """An adapter's metadata by name."""
        return self.adapters[self._position(name)]

    def _position(self, name: str) -> int:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown adapter {name!r}") from None

    def lora(self, name: str) -> LoraAdapter:
        """An adapter's LoRA pairs (copies)."""
        i = self._position(name)
        a = tuple(x[i].copy() for x in self._a)
        b = tuple(x[i].copy() for x in self._b)
        return LoraAdapter(name, (a[0], a[1], a[2]), (b[0], b[1], b[2]), self.config.scale)

    def fingerprint(self) -> str:
        """A short hash of every weight (base and adapters) and of every target's examples.

        The same config builds bitwise the same repository on one machine, but BLAS kernels differ between
        CPUs and training amplifies their last-bit differences, so two machines can build different worlds
        from the same seed. Equal fingerprints mean two results were measured on the same world."""
        digest = hashlib.sha256(self.config.key().encode())
        for name in ("embedding", "w1", "b1", "w2", "b2", "w3", "b3"):
            digest.update(np.ascontiguousarray(getattr(self.base, name), dtype=np.float32).tobytes())
        for stack in (*self._a, *self._b):
            digest.update(np.ascontiguousarray(stack, dtype=np.float32).tobytes())
        for target in self._targets:
            for split in (target.validation, target.holdout, target.test):
                digest.update(np.ascontiguousarray(split.ids).tobytes())
                digest.update(np.ascontiguousarray(split.labels).tobytes())
        return digest.hexdigest()[:16]

    def targets(self) -> tuple[Target, ...]:
        """All targets: out-of-domain ones first."""
        return self._targets

    def target(self, target: str | Target) -> Target:
        """A target by name (a Target passes through after a check that it belongs here)."""
        name = target.name if isinstance(target, Target) else target
        try:
            found = self._target_index[name]
        except (KeyError, TypeError):
            known = ", ".join(self._target_index)
            raise ConfigError(f"unknown target {name!r}; known: {known}") from None
        if isinstance(target, Target) and target is not found:
            raise ConfigError(f"target {name!r} belongs to another repository")
        return found

    def role(self, adapter: str, target: str | Target) -> Role:
        """What an adapter is to a target: specialist, same-domain, same-type, other-task, harmful or
        irrelevant."""
        info = self.adapter(adapter)
        task = self.target(target).task
        if info.kind != "task":
            return info.kind
        same_type = info.task.type_name == task.type_name
        same_domain = info.task.domain == task.domain
        if same_type and same_domain:
            return "specialist"
        return "same-type" if same_type else ("same-domain" if same_domain else "other-task")

    # -- pools -----------------------------------------------------------------------------------
    def pool(self, target: str | Target, size: int, seed: int = 0) -> list[str]:
        """A stratified pool of `size` adapter names for `target`, in a seeded random order.

        Out-of-domain: never the specialist. In-domain: always the specialist. Then about 15% same-domain,
        20% same-type, 10% harmful (those tied to the target's task first) and 10% irrelevant adapters,
        the rest drawn from everything else.
        """
        tgt = self.target(target)
        if not is_int(size) or size < 1:
            raise ConfigError(f"pool size must be a positive integer, got {size!r}")
        candidates = [a.name for a in self.adapters if not (a.name == tgt.specialist and tgt.kind == "ood")]
        if size > len(candidates):
            raise ConfigError(f"target {tgt.name!r} allows pools of at most {len(candidates)} adapters")
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 11, seed, *tgt.name.encode()]))
        chosen: list[str] = [tgt.specialist] if tgt.kind == "id" else []
        by_role: dict[str, list[str]] = {}
        for name in candidates:
            if name not in chosen:
                by_role.setdefault(self.role(name, tgt), []).append(name)
        related = {tgt.task.type_name, tgt.task.domain}
        harmful = sorted(
            by_role.get("harmful", []),
            key=lambda n: 0 if {self.adapter(n).task.type_name, self.adapter(n).task.domain} & related else 1,
        )
        quotas = [
            (by_role.get("same-domain", []), max(1, round(0.15 * size)), True),
            (by_role.get("same-type", []), max(1, round(0.2 * size)), True),
            (harmful, max(1, round(0.1 * size)) if size >= 5 else 0, False),
            (by_role.get("irrelevant", []), round(0.1 * size), True),
        ]
        for names, quota, shuffle in quotas:
            pick = list(rng.permutation(names)) if shuffle else names
            room = size - len(chosen)
            chosen.extend(str(n) for n in pick[: min(quota, room)])
        rest = [n for n in candidates if n not in chosen]
        chosen.extend(str(n) for n in rng.permutation(rest)[: size - len(chosen)])
        return [str(n) for n in rng.permutation(chosen)]

    # -- merging and inference -------------------------------------------------------------------
    def merger(self, names: Sequence[str]) -> PoolMerger:
        """A `PoolMerger` for these adapters (precomputes magnitude orders; reuse it across candidates)."""
        if isinstance(names, str) or len(names) == 0:
            raise ConfigError("a pool is a non-empty sequence of adapter names")
        if len(set(names)) != len(names):
            raise ConfigError("a pool must not name an adapter twice")
        idx = [self._position(n) for n in names]
        return PoolMerger(self.base, [a[idx] for a in self._a], [b[idx] for b in self._b], self.config.scale)

    def merge(self, names: Sequence[str], alpha: ArrayLike, beta: ArrayLike) -> ModelWeights:
        """The merged model of DESIGN 1.1 over the named adapters."""
        return self.merger(names).merge(alpha, beta)

    def single(self, name: str) -> ModelWeights:
        """The base with one adapter applied as trained (W0 + s * B @ A)."""
        return self.base.with_deltas(self.lora(name).deltas())

    def encode(self, prompts: Sequence[str]) -> tuple[IntArray, IntArray]:
        """Token ids (right-padded) and lengths of text prompts; ConfigError for an empty prompt."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ConfigError("prompts must be a non-empty sequence of strings")
        ids, lengths = self.world.tokenizer.encode_batch(prompts)
        if lengths.min() < 1:
            raise ConfigError("every prompt needs at least one word")
        return ids, lengths

    def examples(
        self, prompts: Sequence[str], answers: Sequence[str], answer_set: Sequence[str] | None = None
    ) -> Examples:
        """Labelled examples from text (inline validation data, say); `answer_set` defaults to the labels.

        ConfigError if an answer or an answer-set word is not a token, or an answer is not in the set.
        """
        if isinstance(answers, str) or len(answers) != len(prompts):
            raise ConfigError(f"need one answer per prompt, got {len(answers)} for {len(prompts)}")
        ids, lengths = self.encode(prompts)
        tok = self.world.tokenizer
        answer_ids = (
            self.world.label_ids
            if answer_set is None
            else np.array([tok.token_id(w) for w in answer_set], dtype=np.int64)
        )
        labels = np.array([tok.token_id(a) for a in answers], dtype=np.int64)
        return Examples(tuple(prompts), ids, lengths, labels, answer_ids)

    def next_token_logprobs(self, weights: ModelWeights, prompts: Sequence[str]) -> FloatArray:
        """Log-probabilities of every vocabulary token as the next token, one row per text prompt."""
        ids, lengths = self.encode(prompts)
        return self.next_token_logprobs_ids(weights, ids, lengths)

    def next_token_logprobs_ids(self, weights: ModelWeights, ids: IntArray, lengths: IntArray) -> FloatArray:
        """Like `next_token_logprobs`, from right-padded token ids and lengths."""
        with single_threaded_blas():
            return log_softmax(forward_logits(weights, np.asarray(ids), np.asarray(lengths))).astype(
                np.float64
            )

    def top_logprobs(self, weights: ModelWeights, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The `k` most likely next tokens of one text prompt with their log-probabilities."""
        if not is_int(k) or not 1 <= k <= len(self.world.tokenizer):
            raise ConfigError(f"k must be an integer in [1, {len(self.world.tokenizer)}], got {k!r}")
        row = self.next_token_logprobs(weights, [prompt])[0]
        best = np.argsort(-row, kind="stable")[:k]
        return [(self.world.tokenizer.tokens[int(i)], float(row[i])) for i in best]

    def answer_logprobs(self, weights: ModelWeights, examples: Examples) -> FloatArray:
        """Next-token log-probabilities of each answer-set token (examples x answers): the per-model
        scores an output-space merge (DESIGN 1.2) combines."""
        logprobs = self.next_token_logprobs_ids(weights, examples.ids, examples.lengths)
        out: FloatArray = logprobs[:, examples.answer_ids]
        return out

    def evaluate(self, weights: ModelWeights, examples: Examples) -> Metrics:
        """Mean cross-entropy, accuracy and macro-F1 of `weights` on `examples`."""
        with single_threaded_blas():
            logprobs = log_softmax(forward_logits(weights, examples.ids, examples.lengths))
        return score_logprobs(logprobs, examples.labels, examples.answer_ids)


# -- building ------------------------------------------------------------------------------------
def _stream(config: RepositoryConfig, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, *path]))


def _make_world(config: RepositoryConfig) -> World:
    return build_world(
        seed=config.seed,
        n_types=config.n_types,
        n_domains=config.n_domains,
        n_labels=config.n_labels,
        general_words=config.general_words,
        domain_words=config.domain_words,
        general_features=config.general_features,
        domain_features=config.domain_features,
        pretrain_tasks=config.pretrain_tasks,
        general_per_prompt=config.general_per_prompt,
        domain_per_prompt=config.domain_per_prompt,
        task_specific_scale=config.task_specific_scale,
        temperature=config.temperature,
    )


def _target_tasks(config: RepositoryConfig, world: World) -> list[tuple[Literal["ood", "id"], Task]]:
    n = config.ood_targets + config.id_targets
    out: list[tuple[Literal["ood", "id"], Task]] = []
    for i in range(n):
        kind: Literal["ood", "id"] = "ood" if i < config.ood_targets else "id"
        domain = world.domain_names[(i * config.n_domains) // n]
        out.append((kind, world.grid_task(world.type_names[i % config.n_types], domain)))
    return out


def _adapter_specs(config: RepositoryConfig, world: World) -> list[AdapterInfo]:
    rng = _stream(config, 2)
    sizes = config.train_sizes

    def size() -> int:
        return int(sizes[int(rng.integers(len(sizes)))])

    targets = _target_tasks(config, world)
    target_tasks = {task.name for _, task in targets}
    # An in-domain target's task is low-resource: its adapter saw the smallest corpus.
    low_resource = {task.name for kind, task in targets if kind == "id"}
    # Harmful: the hub's only adapter for some task was trained with inverted labels. Each is tied to a
    # target: another task of the target's domain (a conflicting annotation of the same corpus), else one
    # of its type; never a target's own task.
    harmful: set[str] = set()
    for h in range(config.harmful):
        _, task = targets[h % len(targets)]
        t = world.type_index(task.type_name or "")
        d = world.domain_index(task.domain)
        options = [((t + j) % config.n_types, d) for j in range(1, config.n_types)]
        options += [(t, (d + j) % config.n_domains) for j in range(1, config.n_domains)]
        names = [f"{world.type_names[tt]}/{world.domain_names[dd]}" for tt, dd in options]
        free = [n for n in names if n not in harmful and n not in target_tasks]
        if not free:
            raise ConfigError(
                f"too many harmful adapters ({config.harmful}) for a {config.n_types}x{config.n_domains} grid"
            )
        harmful.add(free[0])
    specs = []
    for type_name in world.type_names:
        for domain_name in world.domain_names:
            task = world.grid_task(type_name, domain_name)
            n = min(sizes) if task.name in low_resource else size()
            if task.name in harmful:
                inverted = world.grid_task(type_name, domain_name, inverted=True)
                specs.append(AdapterInfo(task.name, "harmful", inverted, n))
            else:
                specs.append(AdapterInfo(task.name, "task", task, n))
    for i in range(config.irrelevant):
        domain = world.domain_names[i % config.n_domains]
        suffix = "" if i < config.n_domains else f"#{i // config.n_domains + 1}"
        specs.append(AdapterInfo(f"tr/{domain}{suffix}", "irrelevant", Task("offgrid", None, domain), size()))
    return specs


def _make_targets(config: RepositoryConfig, world: World, names: set[str]) -> list[Target]:
    out = []
    for i, (kind, task) in enumerate(_target_tasks(config, world)):
        rng = _stream(config, 3, i)
        examples = world.sample(task, config.validation_size + config.holdout_size + config.test_size, rng)
        v, h = config.validation_size, config.validation_size + config.holdout_size
        specialist = task.name
        if specialist not in names:
            raise ConfigError(f"target task {specialist} has no adapter")
        out.append(
            Target(
                name=f"{kind}:{task.name}",
                kind=kind,
                task=task,
                specialist=specialist,
                validation=examples.subset(slice(0, v)),
                holdout=examples.subset(slice(v, h)),
                test=examples.subset(slice(h, None)),
            )
        )
    return out


def _train(config: RepositoryConfig, world: World, specs: Sequence[AdapterInfo]) -> dict[str, Float32Array]:
    """Pre-train the base, then train every adapter; returns the arrays a cache file holds."""
    ids, _, targets = world.sample_pretraining(config.pretrain_examples, _stream(config, 4))
    base = pretrain_base(
        ids,
        targets,
        vocab_size=world.vocab_size,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        steps=config.pretrain_steps,
        batch_size=config.pretrain_batch,
        lr=config.pretrain_lr,
        rng=_stream(config, 5),
    )
    n_max = max(config.train_sizes)
    data_rng = _stream(config, 6)
    samples = [world.sample_arrays(spec.task, n_max, data_rng) for spec in specs]
    batch = AdapterBatch(
        embeddings=np.stack(
            [bag_embeddings(base["embedding"], ids, lengths) for ids, lengths, _, _ in samples]
        ),
        targets=np.stack([labels for _, _, labels, _ in samples]),
        sizes=np.array([spec.train_examples for spec in specs], dtype=np.int64),
    )
    fans = [config.embed_dim, config.hidden_dim, config.hidden_dim]
    hub_rng = _stream(config, 7)
    hub = [uniform_init(hub_rng, (config.rank, f), f) for f in fans]
    a_init = []
    for j, fan in enumerate(fans):
        stack = np.repeat(hub[j][None], len(specs), axis=0)
        for i, spec in enumerate(specs):
            # Irrelevant adapters come from another contributor's recipe; in a distinct-A world every
            # adapter has its own seed, as PEFT's default training gives it.
            if spec.kind == "irrelevant" or config.lora_init == "distinct":
                stack[i] = uniform_init(_stream(config, 8, i, j), (config.rank, fan), fan)
        a_init.append(stack)
    a_stacks, b_stacks = train_adapters(
        base,
        batch,
        a_init,
        scale=config.scale,
        steps=config.train_steps,
        batch_size=config.train_batch,
        lr=config.train_lr,
        rng=_stream(config, 9),
    )
    arrays = {f"base.{k}": base[k] for k in _BASE_FIELDS}
    arrays |= {f"a{j}": a for j, a in enumerate(a_stacks)} | {f"b{j}": b for j, b in enumerate(b_stacks)}
    return arrays


def _expected_shapes(config: RepositoryConfig, world: World, n_adapters: int) -> dict[str, tuple[int, ...]]:
    v, e, h, r = world.vocab_size, config.embed_dim, config.hidden_dim, config.rank
    shapes: dict[str, tuple[int, ...]] = {
        "base.embedding": (v, e), "base.w1": (h, e), "base.b1": (h,), "base.w2": (h, h),
        "base.b2": (h,), "base.w3": (v, h), "base.b3": (v,),
    }  # fmt: skip
    for j, (fan_in, fan_out) in enumerate([(e, h), (h, h), (h, v)]):
        shapes[f"a{j}"] = (n_adapters, r, fan_in)
        shapes[f"b{j}"] = (n_adapters, fan_out, r)
    return shapes


def _cache_path(cache_dir: Path, config: RepositoryConfig) -> Path:
    return cache_dir / f"repository-{config.key()[:24]}.npz"


def _load_cached(
    path: Path, config: RepositoryConfig, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Float32Array]:
    """The arrays of a cache file; ValueError (or OSError) if it is unreadable or does not match."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("key") != config.key():
            raise ValueError("cache file was written for another config")
        arrays = {}
        for name, shape in shapes.items():
            arr = data[name]
            if arr.shape != shape or arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"array {name} has shape {arr.shape}, dtype {arr.dtype} or non-finite values"
                )
            arrays[name] = arr
    return arrays


def _write_cache(path: Path, config: RepositoryConfig, arrays: dict[str, Float32Array]) -> None:
    """Write atomically (temp file, fsync, rename), readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    meta = json.dumps({"key": config.key(), "format": FORMAT_VERSION, "config": config.to_dict()})
    write_npz_atomic(path, meta, arrays)


def build_repository(
    config: RepositoryConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    use_cache: bool = True,
) -> Repository:
    """Build (or load from the cache) the repository for `config` (default: the 110-adapter hub).

    `cache_dir` defaults to `default_cache_dir()`; `use_cache=False` neither reads nor writes it. A cache
    file that is corrupt or does not match the config is logged and rebuilt.
    """
    from .._logs import get_logger

    config = RepositoryConfig() if config is None else config
    if not isinstance(config, RepositoryConfig):
        raise ConfigError(f"config must be a RepositoryConfig, got {type(config).__name__}")
    log = get_logger("evomerge_sdk.local")
    world = _make_world(config)
    specs = _adapter_specs(config, world)
    shapes = _expected_shapes(config, world, len(specs))
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), config)
    arrays: dict[str, Float32Array] | None = None
    if use_cache and path.exists():
        try:
            arrays = _load_cached(path, config, shapes)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("repository cache unusable; rebuilding", path=str(path), error=str(exc))
    if arrays is None:
        with single_threaded_blas():
            arrays = _train(config, world, specs)
        if use_cache:
            _write_cache(path, config, arrays)
    base = ModelWeights(**{k: arrays[f"base.{k}"] for k in _BASE_FIELDS})
    targets = _make_targets(config, world, {s.name for s in specs})
    return Repository(
        config,
        world,
        base,
        specs,
        [arrays[f"a{j}"] for j in range(len(LORA_MATRICES))],
        [arrays[f"b{j}"] for j in range(len(LORA_MATRICES))],
        targets,
    )
