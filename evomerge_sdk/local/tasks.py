"""The generative world of the embedded repository: words with latent features, and tasks that read them.

Every content word has latent features: a *general* word (shared by all domains) has features phi in
R^kg, a *domain* word (owned by one domain) has features psi in R^kd. A task prompt is a type marker
(`ner:`, `re:`, ...), a bag of general words and words of one domain, then `?`; the answer is one of a
finite set of label words. For the task (type t, domain d) the label scores are

    score = U_t phi_bar + V_d psi_bar + eps * T_td [phi_bar; psi_bar]

(phi_bar, psi_bar: the prompt's mean general and domain features), and the label is drawn from
softmax(score / tau), so even the best possible classifier is wrong sometimes (about 27% here).

U_t is the type's reading of general words, shared by every domain: that is what transfers across
domains. V_d is the domain's reading of its own lexicon, shared by every type: that transfers across
types. T_td is a small part specific to the pair, which nothing else knows. So (t*, d') and (t', d*)
each know half of (t*, d*), and (t', d') is their common "wrong half": task arithmetic's analogy
(t*, d') + (t', d*) - (t', d') recovers U_t* + V_d* (Ilharco et al., 2023). An *inverted* task draws
from softmax(-score / tau) (a labelling bug: the least likely label), so its negation is useful.

Off-grid tasks (`tr:`) answer with a domain word instead of a label: the "translation", under a fixed
permutation of the domain's lexicon, of one of the prompt's domain words. They share nothing with the
grid.

The base model is pre-trained on a generic mixture over the same words: instruction-like tasks with
their own markers (`p0:`, ...) and random readings of [phi_bar; psi_bar], and a domain language-model
task (predict a word of the prompt's domain). It so learns features for every word, but none of the
repository's readings.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np

from .._types import FloatArray, IntArray
from .._validators import must
from ..errors import ConfigError
from .tokenizer import PAD, QUERY, UNK, Tokenizer, pseudo_words

__all__ = ["DOMAIN_NAMES", "LABEL_WORDS", "TYPE_NAMES", "Examples", "Task", "World", "build_world"]


TYPE_NAMES = ("ner", "re", "et", "ee", "sc")
"""Task types after the paper's NER / RE / ET, plus event extraction and sentence classification."""
DOMAIN_NAMES = (
    "news", "bio", "law", "fin", "med", "chem", "sport", "film", "music",
    "food", "travel", "tech", "geo", "hist", "art", "game", "auto", "edu", "sci", "env",
)  # fmt: skip
LABEL_WORDS = ("red", "orange", "yellow", "green", "blue", "indigo", "violet", "gray")
OFFGRID_MARKER = "tr:"
_WORD_SEED = 20250912
"""Words depend only on the sizes, never on the repository seed, so prompts read the same across seeds."""


def _names(base: tuple[str, ...], n: int, prefix: str) -> tuple[str, ...]:
    extra = tuple(f"{prefix}{i}" for i in range(len(base), n))
    return base[:n] + extra


@attrs.frozen
class Task:
    """One task of the world: a grid task (type, domain), possibly inverted, or an off-grid task."""

    kind: Literal["grid", "offgrid"]
    type_name: str | None
    domain: str
    inverted: bool = False

    @property
    def name(self) -> str:
        """Short name: `ner/bio`, `ner/bio~inverted`, `tr/bio`."""
        if self.kind == "offgrid":
            return f"tr/{self.domain}"
        return f"{self.type_name}/{self.domain}" + ("~inverted" if self.inverted else "")


@attrs.frozen(eq=False)
class Examples:
    """Labelled prompts of one task: text, right-padded token ids with lengths, gold answer token ids.

    `answer_ids` is the finite answer set; accuracy and macro-F1 pick the most likely of these tokens.
    """

    prompts: tuple[str, ...] = attrs.field(validator=must(bool, "an example set needs at least one example"))
    ids: IntArray
    lengths: IntArray = attrs.field(
        validator=must(lambda v: v.size == 0 or v.min() >= 1, "every prompt needs at least one token")
    )
    labels: IntArray
    answer_ids: IntArray = attrs.field(
        validator=must(
            lambda v: v.ndim == 1 and v.size > 0, "the answer set must be a non-empty vector of token ids"
        )
    )

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants: every array fits the prompts, every gold label is in the answer set."""
        n = len(self.prompts)
        if self.ids.ndim != 2 or self.ids.shape[0] != n or self.lengths.shape != (n,):
            raise ConfigError(f"ids {self.ids.shape} / lengths {self.lengths.shape} do not fit {n} prompts")
        if self.labels.shape != (n,):
            raise ConfigError(f"labels must have shape ({n},), got {self.labels.shape}")
        if not np.all(np.isin(self.labels, self.answer_ids)):
            raise ConfigError("every gold label must be in the answer set")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def tokens(self) -> IntArray:
        """Tokens scoring each example reads: its prompt and the gold answer token (teacher-forced)."""
        out: IntArray = (self.lengths + 1).astype(np.int64)
        return out

    def subset(self, index: slice | IntArray) -> Examples:
        """The examples at `index` (a slice or an integer array)."""
        sel = np.arange(len(self))[index]
        return Examples(
            prompts=tuple(self.prompts[i] for i in sel),
            ids=self.ids[sel],
            lengths=self.lengths[sel],
            labels=self.labels[sel],
            answer_ids=self.answer_ids,
        )


@attrs.frozen(eq=False)
class World:
    """Vocabulary, latent word features and the readings that define every task. See the module doc."""

    tokenizer: Tokenizer
    type_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    type_marker_ids: IntArray
    offgrid_marker_id: int
    pretrain_marker_ids: IntArray
    label_ids: IntArray
    general_ids: IntArray
    domain_ids: IntArray  # (domains, words per domain)
    general_features: FloatArray  # (general words, kg)
    domain_features: FloatArray  # (domains, words per domain, kd)
    type_readings: FloatArray  # U: (types, labels, kg)
    domain_readings: FloatArray  # V: (domains, labels, kd)
    task_specific: FloatArray  # T: (types, domains, labels, kg + kd), already scaled by eps
    pretrain_readings: FloatArray  # (pretrain tasks, labels, kg + kd)
    translations: IntArray  # (domains, words per domain): permutation of each lexicon
    general_per_prompt: int
    domain_per_prompt: int
    temperature: float

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.tokenizer)

    def type_index(self, name: str) -> int:
        """Index of a task type by name."""
        if name not in self.type_names:
            raise ConfigError(f"unknown task type {name!r}; known: {', '.join(self.type_names)}")
        return self.type_names.index(name)

    def domain_index(self, name: str) -> int:
        """Index of a domain by name."""
        if name not in self.domain_names:
            raise ConfigError(f"unknown domain {name!r}; known: {', '.join(self.domain_names)}")
        return self.domain_names.index(name)

    def grid_task(self, type_name: str, domain: str, *, inverted: bool = False) -> Task:
        """The grid task (type, domain), checked against the world."""
        self.type_index(type_name)
        self.domain_index(domain)
        return Task("grid", type_name, domain, inverted)

    # -- sampling --------------------------------------------------------------------------------
    def _bags(self, rng: np.random.Generator, domains: IntArray) -> tuple[IntArray, IntArray, FloatArray]:
        """General and domain word indices per prompt, and the prompt's [phi_bar; psi_bar]."""
        n = domains.shape[0]
        gen = _distinct(rng, n, self.general_ids.shape[0], self.general_per_prompt)
        dom = _distinct(rng, n, self.domain_ids.shape[1], self.domain_per_prompt)
        feats = np.concatenate(
            [self.general_features[gen].mean(1), self.domain_features[domains[:, None], dom].mean(1)], axis=1
        )
        return gen, dom, feats

    def _assemble(
        self,
        rng: np.random.Generator,
        markers: IntArray | None,
        gen: IntArray,
        dom: IntArray,
        domains: IntArray,
    ) -> tuple[IntArray, IntArray]:
        """Token ids (marker, shuffled words, `?`) and lengths; markers may be None (no marker)."""
        words = np.concatenate([self.general_ids[gen], self.domain_ids[domains[:, None], dom]], axis=1)
        order = np.argsort(rng.random(words.shape), axis=1)
        words = np.take_along_axis(words, order, axis=1)
        n = words.shape[0]
        query = np.full((n, 1), self.tokenizer.query_id, dtype=np.int64)
        parts = [words, query] if markers is None else [markers[:, None], words, query]
        ids = np.concatenate(parts, axis=1).astype(np.int64)
        return ids, np.full(n, ids.shape[1], dtype=np.int64)

    def label_scores(self, task: Task, feats: FloatArray) -> FloatArray:
        """The grid task's label scores for prompts with features `feats` (before the inversion)."""
        t = self.type_index(task.type_name or "")
        d = self.domain_index(task.domain)
        reading = np.concatenate([self.type_readings[t], self.domain_readings[d]], axis=1)
        out: FloatArray = feats @ (reading + self.task_specific[t, d]).T
        return out

    def sample(self, task: Task, n: int, rng: np.random.Generator) -> Examples:
        """`n` labelled prompts of `task`, drawn with `rng`."""
        ids, lengths, labels, answers = self.sample_arrays(task, n, rng)
        prompts = tuple(self.tokenizer.decode(row[:k]) for row, k in zip(ids, lengths, strict=True))
        return Examples(prompts, ids, lengths, labels, answers)

    def sample_arrays(
        self, task: Task, n: int, rng: np.random.Generator
    ) -> tuple[IntArray, IntArray, IntArray, IntArray]:
        """Like `sample` without the text: token ids, lengths, gold answer ids and the answer set."""
        if n < 1:
            raise ConfigError(f"need at least one example, got {n}")
        d = self.domain_index(task.domain)
        domains = np.full(n, d, dtype=np.int64)
        gen, dom, feats = self._bags(rng, domains)
        if task.kind == "offgrid":
            markers = np.full(n, self.offgrid_marker_id, dtype=np.int64)
            pick = dom[np.arange(n), rng.integers(0, dom.shape[1], n)]
            labels = self.domain_ids[d, self.translations[d, pick]]
            answers = self.domain_ids[d]
        else:
            markers = np.full(n, self.type_marker_ids[self.type_index(task.type_name or "")], dtype=np.int64)
            sign = -1.0 if task.inverted else 1.0
            z = sign * self.label_scores(task, feats) / self.temperature
            labels = self.label_ids[np.argmax(z + rng.gumbel(size=z.shape), axis=1)]
            answers = self.label_ids
        ids, lengths = self._assemble(rng, markers, gen, dom, domains)
        return ids, lengths, labels.astype(np.int64), answers.astype(np.int64)

    def sample_pretraining(
        self, n: int, rng: np.random.Generator, instruction_share: float = 0.6
    ) -> tuple[IntArray, IntArray, IntArray]:
        """`n` pre-training prompts (ids, lengths, next-token targets) from the generic mixture."""
        domains = rng.integers(0, len(self.domain_names), n).astype(np.int64)
        gen, dom, feats = self._bags(rng, domains)
        instruct = rng.random(n) < instruction_share
        tasks = rng.integers(0, self.pretrain_marker_ids.size, n)
        # Language-model examples carry `?` in the marker slot, so every prompt has the same length.
        markers = np.where(instruct, self.pretrain_marker_ids[tasks], self.tokenizer.query_id).astype(
            np.int64
        )
        ids, lengths = self._assemble(rng, markers, gen, dom, domains)
        scores = np.einsum("nk,nlk->nl", feats, self.pretrain_readings[tasks]) / self.temperature
        labels = self.label_ids[np.argmax(scores + rng.gumbel(size=scores.shape), axis=1)]
        lm = self.domain_ids[domains, rng.integers(0, self.domain_ids.shape[1], n)]
        return ids, lengths, np.where(instruct, labels, lm).astype(np.int64)


def _distinct(rng: np.random.Generator, n: int, high: int, k: int) -> IntArray:
    """n rows of k distinct integers from [0, high), each row uniform; rows with a repeat are redrawn."""
    out = rng.integers(0, high, (n, k))
    redo = np.arange(n)
    while redo.size:
        block = np.sort(out[redo], axis=1)
        redo = redo[(block[:, 1:] == block[:, :-1]).any(axis=1)]
        out[redo] = rng.integers(0, high, (redo.size, k))
    return out


def build_world(
    *,
    seed: int,
    n_types: int,
    n_domains: int,
    n_labels: int,
    general_words: int,
    domain_words: int,
    general_features: int,
    domain_features: int,
    pretrain_tasks: int,
    general_per_prompt: int,
    domain_per_prompt: int,
    task_specific_scale: float,
    temperature: float,
) -> World:
    """The world for these sizes; features and readings come from `seed`, words only from the sizes."""
    if general_per_prompt > general_words or domain_per_prompt > domain_words:
        raise ConfigError("a prompt cannot hold more distinct words than the vocabulary has")
    type_names = _names(TYPE_NAMES, n_types, "type")
    domain_names = _names(DOMAIN_NAMES, n_domains, "dom")
    labels = _names(LABEL_WORDS, n_labels, "label")
    markers = tuple(f"{t}:" for t in type_names)
    pretrain = tuple(f"p{i}:" for i in range(pretrain_tasks))
    fixed: tuple[str, ...] = (PAD, UNK, QUERY, *markers, OFFGRID_MARKER, *pretrain, *labels)
    words = pseudo_words(general_words + n_domains * domain_words, _WORD_SEED, taken=fixed)
    tokenizer = Tokenizer(fixed + tuple(words))

    def span(start: int, n: int) -> IntArray:
        return np.arange(start, start + n, dtype=np.int64)

    first_label = 3 + n_types + 1 + pretrain_tasks
    first_word = first_label + n_labels
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    kg, kd = general_features, domain_features
    return World(
        tokenizer=tokenizer,
        type_names=type_names,
        domain_names=domain_names,
        type_marker_ids=span(3, n_types),
        offgrid_marker_id=3 + n_types,
        pretrain_marker_ids=span(4 + n_types, pretrain_tasks),
        label_ids=span(first_label, n_labels),
        general_ids=span(first_word, general_words),
        domain_ids=span(first_word + general_words, n_domains * domain_words).reshape(
            n_domains, domain_words
        ),
        general_features=rng.standard_normal((general_words, kg)),
        domain_features=rng.standard_normal((n_domains, domain_words, kd)),
        type_readings=rng.standard_normal((n_types, n_labels, kg)),
        domain_readings=rng.standard_normal((n_domains, n_labels, kd)),
        task_specific=task_specific_scale * rng.standard_normal((n_types, n_domains, n_labels, kg + kd)),
        pretrain_readings=rng.standard_normal((pretrain_tasks, n_labels, kg + kd)),
        translations=np.stack([rng.permutation(domain_words) for _ in range(n_domains)]).astype(np.int64),
        general_per_prompt=general_per_prompt,
        domain_per_prompt=domain_per_prompt,
        temperature=temperature,
    )
