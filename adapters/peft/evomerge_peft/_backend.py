"""The PEFT backend of the merge service: real LoRA adapters on a transformers model behind the SDK's
`LocalService` (its routes, auth, body and session caps, validation and error mapping, unchanged).

Presets are pools (`--pool NAME=DIR ...`, all on one loaded base); datasets are JSONL files the server was
given (`--data NAME=FILE`), each line `{"prompt", "completion"}` or `{"messages": [...]}` (the last message
is the assistant's answer; the others go through the tokenizer's chat template). A session may also send
the same objects inline; a session that names none scores the first dataset given. A session never names
a file: the server reads only what its operator listed.

Evaluate returns the mean token cross-entropy on completion tokens and the tokens read; materialize writes
a PEFT adapter folder and serves it on the chat route; chat and complete generate with the base, any
adapter, a materialised merge or a merge (alpha, beta), with log-probabilities. Every forward pass runs in
the scorer's one slot under its lock, so concurrent requests get exactly their serial answers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from numpy.typing import NDArray

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.backend import (
    Decoding,
    Evaluation,
    ExampleSet,
    GeneratedToken,
    Generation,
    InvalidField,
    NotFound,
    Preset,
)
from evomerge_sdk.local.repository_backend import choose_token

from ._evaluate import Example, Scorer, TokenisedSet, tokenise
from ._materialize import write_adapter
from ._merge import MERGE_FORMS, MergeForm
from ._pool import AdapterPool, Base, load_pool

__all__ = ["BASE_MODEL", "PeftBackend", "read_examples"]

BASE_MODEL = "base"
"""The base model's name on the chat route and as every preset's `model_name_or_path`."""
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@attrs.frozen(eq=False)
class _Examples:
    """A tokenised set and which of its examples a session scores (the service's `ExampleSet`)."""

    data: TokenisedSet
    index: tuple[int, ...]

    @property
    def tokens(self) -> IntArray:
        """Tokens one evaluation reads, per example (prompt and completion, all input)."""
        return np.array([len(self.data.ids[i]) for i in self.index], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index: IntArray | slice) -> _Examples:
        """The examples at `index`, in order."""
        picked = np.arange(len(self.index))[index]
        return _Examples(self.data, tuple(self.index[int(i)] for i in picked))


def example_of(item: object, where: str, tokenizer: Any) -> Example:
    """One validation example from its JSON object; `InvalidField` naming `where` otherwise."""
    if not isinstance(item, dict):
        raise InvalidField(f"{where} must be an object with prompt and completion, or messages")
    if "messages" in item:
        if set(item) != {"messages"}:
            raise InvalidField(f"{where}: give messages alone, or prompt and completion")
        messages = item["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2
        ok = ok and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise InvalidField(
                f"{where}.messages must be at least two {{role, content}} objects with string content"
            )
        if messages[-1]["role"] != "assistant":
            raise InvalidField(
                f"{where}.messages must end with the assistant's answer (the scored completion)"
            )
        if tokenizer.chat_template is None:
            raise InvalidField(
                f"{where}: this base model's tokenizer has no chat template; send prompt and completion"
            )
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template is the model's own jinja code: any failure is the input's
            raise InvalidField(f"{where}.messages do not fit the chat template: {exc}") from None
        return Example(str(prompt), messages[-1]["content"], special_tokens=False)
    if set(item) != {"prompt", "completion"}:
        raise InvalidField(f"{where} must have exactly prompt and completion (or messages)")
    prompt, completion = item["prompt"], item["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion:
        raise InvalidField(f"{where}: prompt and completion must be non-empty strings")
    return Example(prompt, completion)


def read_examples(path: str | Path, tokenizer: Any) -> list[Example]:
    """The examples of a JSONL file; ConfigError naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"validation data {str(file)!r} is not a file")
    out = []
    for k, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            out.append(example_of(item, f"{file}:{k}", tokenizer))
        except ValueError as exc:
            raise ConfigError(f"{file}:{k} is not a JSON object: {exc}") from None
        except InvalidField as exc:
            raise ConfigError(exc.message) from None
    if not out:
        raise ConfigError(f"validation data {str(file)!r} holds no examples")
    return out


class PeftBackend:
    """Pools of PEFT LoRA adapters on one loaded base, as a `MergeBackend` for `LocalService`."""

    base_model = BASE_MODEL

    def __init__(
        self,
        base: Base,
        pools: Mapping[str, Mapping[str, str | Path]],
        datasets: Mapping[str, str | Path] | None = None,
        *,
        merge_form: MergeForm = "paper",
        batch_size: int = 32,
    ) -> None:
        if merge_form not in MERGE_FORMS:
            raise ConfigError(f"merge_form must be one of {MERGE_FORMS}, got {merge_form!r}")
        if not isinstance(pools, Mapping) or not pools:
            raise ConfigError("give at least one pool: {name: {adapter: folder}}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.base = base
        self.scorer = Scorer.of(base)
        self.merge_form: MergeForm = merge_form
        self.batch_size = batch_size
        self.pools: dict[str, AdapterPool] = {}
        for name, adapters in pools.items():
            if not isinstance(name, str) or not name or name == BASE_MODEL:
                raise ConfigError(
                    f"pool names must be non-empty strings other than {BASE_MODEL!r}, got {name!r}"
                )
            self.pools[name] = load_pool(base, adapters)
        self.adapter_paths: dict[str, Path] = {}
        for pool in self.pools.values():
            for adapter, path in zip(pool.names, pool.paths, strict=True):
                if self.adapter_paths.setdefault(adapter, path) != path:
                    raise ConfigError(f"adapter name {adapter!r} names two folders in different pools")
        self.datasets: dict[str, _Examples] = {}
        for name, file in (datasets or {}).items():
            data = tokenise(base.tokenizer, read_examples(file, base.tokenizer), batch_size)
            self.datasets[name] = _Examples(data, tuple(range(len(data))))
        default = next(iter(self.datasets), None)  # the first dataset given: what a bare session scores
        blob = json.dumps(
            [str(base.path), {k: [str(p) for p in v.paths] for k, v in self.pools.items()}, merge_form],
            sort_keys=True,
        )
        self.revision = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.presets = {
            name: Preset(
                preset_id=name,
                adapters=pool.names,
                datasets=tuple(self.datasets),
                default_dataset=default,
                extra={
                    "merge_form": merge_form,
                    "rank": pool.rank,
                    "backend": "peft",
                    "revision": self.revision,
                },
            )
            for name, pool in self.pools.items()
        }
        self._singles: dict[str, AdapterPool] = {}
        self._merged: dict[str, AdapterPool] = {}
        self._lock = threading.Lock()

    # -- data ------------------------------------------------------------------------------------
    def dataset(self, preset: Preset, name: str) -> ExampleSet:
        """A dataset the server was given (every preset offers all of them)."""
        found = self.datasets.get(name)
        if found is None:
            raise InvalidField(f"unknown dataset {name!r}; this server has {sorted(self.datasets)}")
        return found

    def inline_examples(self, items: Sequence[Any]) -> ExampleSet:
        """`query_plus.examples`: {"prompt", "completion"} or {"messages"} objects, tokenised once."""
        examples = [
            example_of(item, f"query_plus.examples[{k}]", self.base.tokenizer) for k, item in enumerate(items)
        ]
        data = tokenise(self.base.tokenizer, examples, self.batch_size)
        return _Examples(data, tuple(range(len(data))))

    def prompt_tokens(self, text: str) -> int:
        """Tokens the model reads for a prompt."""
        return len(self.base.tokenizer(text)["input_ids"])

    # -- merges ----------------------------------------------------------------------------------
    def _pool(self, preset: Preset) -> AdapterPool:
        pool = self.pools.get(preset.preset_id)
        if pool is None:
            raise NotFound(f"unknown preset {preset.preset_id!r}")
        return pool

    def evaluate(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, examples: ExampleSet
    ) -> Evaluation:
        """Mean token cross-entropy of the merge on the examples' completion tokens, and tokens read."""
        assert isinstance(examples, _Examples), type(examples)
        with self.scorer.merged(self._pool(preset), alpha, beta, self.merge_form) as model:
            loss, tokens = self.scorer.loss(model, examples.data, examples.index)
        return Evaluation(loss=loss, metrics={}, n_examples=len(examples), input_tokens=tokens)

    def materialize(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, directory: Path
    ) -> dict[str, Any]:
        """Write the merge as a PEFT adapter folder under `directory`; serve it on the chat route."""
        pool = self._pool(preset)
        key = json.dumps(
            [self.revision, preset.preset_id, alpha.tolist(), beta.tolist()], separators=(",", ":")
        )
        name = "merged-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        provenance = {
            "format": "evomerge-peft/merged-lora",
            "version": 1,
            "preset_id": preset.preset_id,
            "adapters": list(pool.names),
            "adapter_folders": [str(p) for p in pool.paths],
            "alpha": alpha.tolist(),
            "beta": beta.tolist(),
            "merge_form": self.merge_form,
            "base_model": str(self.base.path),
        }
        folder = write_adapter(directory / name, self.base, pool, alpha, beta, self.merge_form, provenance)
        served = load_pool(self.base, {name: folder})  # what is served is what was written
        with self._lock:
            self._merged[name] = served
        return {
            "path": str(folder),
            "adapter_dir": str(folder),
            "adapter_name": name,
            "format": "peft",
            "merge_form": self.merge_form,
            "rank": served.rank,
        }

    # -- generation ------------------------------------------------------------------------------
    def chat_models(self) -> list[str]:
        """The base, every adapter of every pool, every materialised merge."""
        with self._lock:
            merged = list(self._merged)
        return [BASE_MODEL, *self.adapter_paths, *merged]

    def _single(self, model: str) -> AdapterPool | None:
        """The pool of one behind a chat model name (None for the base); NotFound for an unknown name."""
        if model == BASE_MODEL:
            return None
        with self._lock:
            found = self._merged.get(model) or self._singles.get(model)
        if found is not None:
            return found
        path = self.adapter_paths.get(model)
        if path is None:
            raise NotFound(
                f"The model {model!r} does not exist: use {BASE_MODEL!r}, an adapter or a merge name",
                "model_not_found",
            )
        single = load_pool(self.base, {model: path})
        with self._lock:
            return self._singles.setdefault(model, single)

    def chat(self, model: str, prompt: str, decoding: Decoding, top_logprobs: int, seed: int) -> Generation:
        """A completion of `prompt` by the base, an adapter or a materialised merge."""
        single = self._single(model)
        if single is None:
            with self.scorer.plain() as m:
                return self._generate(m, prompt, decoding, top_logprobs, seed)
        with self.scorer.merged(single, [1.0], [1.0], "paper") as m:
            return self._generate(m, prompt, decoding, top_logprobs, seed)

    def complete(
        self, preset: Preset, alpha: FloatArray, beta: FloatArray, prompt: str, decoding: Decoding,
        top_logprobs: int, seed: int,
    ) -> Generation:  # fmt: skip
        """A completion of `prompt` by the merge (alpha, beta) of the preset's pool."""
        with self.scorer.merged(self._pool(preset), alpha, beta, self.merge_form) as m:
            return self._generate(m, prompt, decoding, top_logprobs, seed)

    def _generate(
        self, model: Any, prompt: str, decoding: Decoding, top_logprobs: int, seed: int
    ) -> Generation:
        """Up to `max_new_tokens` tokens (stopping at end of sequence), each with its log-probabilities."""
        tokenizer = self.base.tokenizer
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise InvalidField("the prompt has no tokens")
        prompt_tokens = len(ids)
        out: list[GeneratedToken] = []
        for step in range(decoding.max_new_tokens):
            row = self.scorer.next_token_logprobs(model, ids).to(torch.float64).numpy()
            choice = choose_token(row, decoding, (seed + step) % 2**63)
            order = np.argsort(-row, kind="stable")[:top_logprobs]
            out.append(
                GeneratedToken(
                    token=tokenizer.decode([choice]),
                    logprob=float(row[choice]),
                    top_logprobs=tuple((tokenizer.decode([int(i)]), float(row[i])) for i in order),
                )
            )
            ids.append(choice)
            if choice == tokenizer.eos_token_id:
                break
        text = tokenizer.decode(ids[prompt_tokens:], skip_special_tokens=True)
        return Generation(text=text, tokens=tuple(out), prompt_tokens=prompt_tokens)
