"""The embedded numpy repository as a `MergeBackend`: the presets it offers and the work behind them.

Presets: `"<target>/pool-<size>"` (the repository's stratified pool of that size for the target, drawn
with `pool_seed`) for every target and every size the repository can fill, and `"hub"` (every adapter,
every target's data). Datasets are `"<target>:<split>"` with split `validation`, `held_out` or `test`;
inline examples are `{"prompt", "label"}` objects with labels from the answer set.

Token accounting (what `usage` reports): scoring one example reads its prompt tokens and the gold answer
token, all as input (a teacher-forced cross-entropy generates nothing); a completion reads the prompt and
generates one token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_npz_atomic
from .._types import FloatArray
from ..errors import ConfigError
from .backend import (
    Decoding,
    Evaluation,
    ExampleSet,
    GeneratedToken,
    Generation,
    InvalidField,
    NotFound,
    Preset,
)
from .merge import PoolMerger
from .model import ModelWeights
from .repository import Repository, Target
from .tasks import Examples

__all__ = ["BASE_MODEL", "DATASET_SPLITS", "RepositoryBackend", "choose_token", "preset_id"]


BASE_MODEL = "base"
"""The name of the base model on the chat route, and the `model_name_or_path` every preset is built on."""
DATASET_SPLITS = {"validation": "validation", "held_out": "holdout", "test": "test"}
"""Dataset split names of `query_plus.dataset` ("<target>:<split>") -> `Target` attribute."""


def preset_id(target: str, size: int) -> str:
    """The id of a target's pool preset of a size."""
    return f"{target}/pool-{size}"


def _examples(examples: ExampleSet) -> Examples:
    # The service hands back what this backend made; anything else is a bug in the caller.
    assert isinstance(examples, Examples), type(examples)
    return examples


class RepositoryBackend:
    """The presets a repository offers and the mergers and models behind them (built on first use)."""

    base_model = BASE_MODEL

    def __init__(
        self, repository: Repository, pool_sizes: Sequence[int] = (5, 20, 100), pool_seed: int = 0
    ) -> None:
        self.repository = repository
        self.revision = repository.config.key()[:16]
        tokenizer = repository.tokenizer
        self.answer_ids = repository.world.label_ids
        self.answer_set = tuple(tokenizer.tokens[int(i)] for i in self.answer_ids)
        presets: dict[str, Preset] = {}
        self._targets: dict[str, tuple[Target, ...]] = {}
        limit = len(repository.adapter_names) - 1  # an out-of-domain target's specialist stays out
        sizes = sorted(set(pool_sizes))
        if all(size > limit for size in sizes):
            raise ConfigError(
                f"pool sizes {sizes} do not fit a repository of {limit + 1} adapters (at most {limit})"
            )
        for target in repository.targets():
            for size in sizes:
                if size > limit:
                    continue  # a pool this size does not exist here (the hub preset holds everything)
                names = repository.pool(target, size, pool_seed)
                pid = preset_id(target.name, size)
                presets[pid] = self._preset(pid, tuple(names), (target,), pool_seed)
        presets["hub"] = self._preset("hub", repository.adapter_names, repository.targets(), None)
        self.presets: Mapping[str, Preset] = presets
        self._mergers: dict[str, PoolMerger] = {}
        self._models: OrderedDict[str, ModelWeights] = OrderedDict()
        self._merged: OrderedDict[str, ModelWeights] = OrderedDict()
        self._lock = threading.Lock()

    def _preset(
        self, pid: str, adapters: tuple[str, ...], targets: tuple[Target, ...], pool_seed: int | None
    ) -> Preset:
        self._targets[pid] = targets
        return Preset(
            pid,
            adapters,
            datasets=tuple(f"{t.name}:{split}" for t in targets for split in DATASET_SPLITS),
            default_dataset=f"{targets[0].name}:validation" if len(targets) == 1 else None,
            extra={
                "targets": [{"name": t.name, "kind": t.kind} for t in targets],
                "answer_set": list(self.answer_set),
                "revision": self.revision,
                "pool_seed": pool_seed,
            },
        )

    def merger(self, preset: Preset) -> PoolMerger:
        """The preset's merger (magnitude orders computed once)."""
        with self._lock:
            merger = self._mergers.get(preset.preset_id)
        if merger is None:
            merger = self.repository.merger(preset.adapters)
            with self._lock:
                merger = self._mergers.setdefault(preset.preset_id, merger)
        return merger

    # -- datasets --------------------------------------------------------------------------------
    def dataset(self, preset: Preset, name: str) -> Examples:
        """The examples of a named dataset "<target>:<split>" the preset offers."""
        if not isinstance(name, str) or ":" not in name:
            raise InvalidField(f"query_plus.dataset must look like '<target>:validation', got {name!r}")
        target_name, _, split = name.rpartition(":")
        if split not in DATASET_SPLITS:
            raise InvalidField(f"dataset split must be one of {sorted(DATASET_SPLITS)}, got {split!r}")
        for target in self._targets[preset.preset_id]:
            if target.name == target_name:
                examples: Examples = getattr(target, DATASET_SPLITS[split])
                return examples
        raise InvalidField(
            f"preset {preset.preset_id!r} has no dataset {name!r}; it offers {list(preset.datasets)}"
        )

    def inline_examples(self, items: Sequence[Any]) -> Examples:
        """Inline validation data: [{"prompt": str, "label": str}] with labels from the answer set."""
        tokenizer = self.repository.tokenizer
        answers = set(self.answer_set)
        prompts, labels = [], []
        for i, ex in enumerate(items):
            if not isinstance(ex, dict) or set(ex) != {"prompt", "label"}:
                raise InvalidField(
                    f"query_plus.examples[{i}] must be an object with exactly prompt and label"
                )
            prompt, label = ex["prompt"], ex["label"]
            if not isinstance(prompt, str) or not isinstance(label, str):
                raise InvalidField(f"query_plus.examples[{i}]: prompt and label must be strings")
            if not tokenizer.split(prompt):
                raise InvalidField(f"query_plus.examples[{i}].prompt has no words")
            if label not in answers:
                raise InvalidField(
                    f"query_plus.examples[{i}].label {label!r} is not in the answer set "
                    f"{list(self.answer_set)}"
                )
            prompts.append(prompt)
            labels.append(label)
        return self.repository.examples(prompts, labels)

    # -- models for completions ------------------------------------------------------------------
    def chat_models(self) -> list[str]:
        """Every model name the chat route serves: the base, each adapter, each materialized merge."""
        with self._lock:
            merged = list(self._merged)
        return [BASE_MODEL, *self.repository.adapter_names, *merged]

    def model(self, name: str) -> ModelWeights:
        """The weights behind a chat model name; `NotFound` (OpenAI's `model_not_found`) otherwise."""
        if name == BASE_MODEL:
            return self.repository.base
        with self._lock:
            weights = self._models.get(name) or self._merged.get(name)
        if weights is not None:
            return weights
        if name not in self.repository.adapter_names:
            raise NotFound(
                f"The model {name!r} does not exist: use {BASE_MODEL!r} or an adapter name", "model_not_found"
            )
        weights = self.repository.single(name)
        with self._lock:
            self._models[name] = weights
        return weights

    def register_merged(self, name: str, weights: ModelWeights, keep: int = 64) -> None:
        """Serve a materialized merge on the chat route (the `keep` most recent ones)."""
        with self._lock:
            self._merged[name] = weights
            self._merged.move_to_end(name)
            while len(self._merged) > keep:
                self._merged.popitem(last=False)

    def prompt_tokens(self, text: str) -> int:
        """Words of `text` the embedded model reads."""
        return len(self.repository.tokenizer.split(text))

    # -- the work (each a pure function of its arguments; run in a worker thread) ------------------
    def evaluate(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, examples: ExampleSet
    ) -> Evaluation:
        """Loss, accuracy and macro-F1 of the merge (alpha, beta) on `examples`."""
        data = _examples(examples)
        with np.errstate(all="ignore"):
            weights = self.merger(preset).merge(alpha, beta)
            metrics = self.repository.evaluate(weights, data)
        return Evaluation(
            loss=metrics.loss,
            metrics={"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1},
            n_examples=metrics.n,
            input_tokens=int(data.tokens.sum()),
        )

    def chat(self, model: str, prompt: str, decoding: Decoding, top_logprobs: int, seed: int) -> Generation:
        """One generated token of a served model."""
        return self._next_token(self.model(model), prompt, decoding, top_logprobs, seed)

    def complete(
        self,
        preset: Preset,
        alpha: FloatArray,
        beta: FloatArray,
        prompt: str,
        decoding: Decoding,
        top_logprobs: int,
        seed: int,
    ) -> Generation:
        """One generated token of the merge (alpha, beta)."""
        with np.errstate(all="ignore"):
            weights = self.merger(preset).merge(alpha, beta)
        return self._next_token(weights, prompt, decoding, top_logprobs, seed)

    def _next_token(
        self, weights: ModelWeights, prompt: str, decoding: Decoding, top_logprobs: int, seed: int
    ) -> Generation:
        tokenizer = self.repository.tokenizer
        words = tokenizer.split(prompt)
        if not words:
            raise InvalidField("the prompt has no words")
        with np.errstate(all="ignore"):
            row = self.repository.next_token_logprobs(weights, [prompt])[0]
        choice = choose_token(row, decoding, seed)
        order = np.argsort(-row, kind="stable")[:top_logprobs]
        token = tokenizer.tokens[choice]
        top = tuple((tokenizer.tokens[int(i)], float(row[i])) for i in order)
        return Generation(token, (GeneratedToken(token, float(row[choice]), top),), len(words))

    def materialize(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, directory: Path
    ) -> dict[str, Any]:
        """Write the merged LoRA pairs (A_m, B_m per adapted matrix) as .npz; serve the merge on chat."""
        digest = hashlib.sha256(
            json.dumps(
                [self.revision, preset.preset_id, alpha.tolist(), beta.tolist()],
                separators=(",", ":"),
            ).encode()
        ).hexdigest()[:16]
        name = f"merged-{digest}"
        merger = self.merger(preset)
        with np.errstate(all="ignore"):
            pairs = merger.merged_pairs(alpha, beta)
            weights = merger.merge(alpha, beta)
        arrays: dict[str, Any] = {}
        for k, (a_m, b_m) in enumerate(pairs):
            arrays[f"a{k}"] = a_m
            arrays[f"b{k}"] = b_m
        meta = {
            "format": "evomerge-sdk/merged-lora",
            "version": 1,
            "adapter_name": name,
            "preset_id": preset.preset_id,
            "adapters": list(preset.adapters),
            "alpha": alpha.tolist(),
            "beta": beta.tolist(),
            "scale": merger.scale,
            "matrices": ["w1", "w2", "w3"],
            "revision": self.revision,
        }
        path = directory / f"{name}.npz"
        write_npz_atomic(path, meta, arrays)
        self.register_merged(name, weights)
        return {"path": str(path), "adapter_name": name, "format": "npz", "bytes": path.stat().st_size}


def choose_token(row: FloatArray, decoding: Decoding, seed: int) -> int:
    """Greedy at temperature 0; otherwise a draw from the top-k / top-p filtered distribution (seeded)."""
    if decoding.temperature == 0.0:
        return int(np.argmax(row))
    order = np.argsort(-row, kind="stable")
    if decoding.top_k:
        order = order[: decoding.top_k]
    z = row[order] / decoding.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if decoding.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), decoding.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    rng = np.random.default_rng(seed)
    return int(order[rng.choice(order.size, p=p)])
