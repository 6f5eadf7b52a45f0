"""Fast evaluation of merges: one preallocated LoRA slot per (rank, modules), written in place per candidate.

The base is wrapped by PEFT once. A slot is a PEFT LoRA adapter of the merged rank with scaling 1 (the
pool folds each adapter's own scaling into its weights); a candidate's (A_m, B_m) are copied into the
slot's existing parameters, so a candidate allocates no module and rebuilds nothing. Validation data is
tokenised once per session (`TokenisedSet`), scored in padded batches, the loss counted on completion
tokens only, under `torch.inference_mode`. One lock serialises slot writes with the forward passes that
read them: concurrent requests get exactly the answers they would get one at a time.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import numpy as np
import torch
from numpy.typing import ArrayLike

from evomerge_sdk.errors import ConfigError

from ._merge import MergeForm, merge_module
from ._pool import AdapterPool, Base

__all__ = ["Example", "Scorer", "TokenisedSet", "first_token_accuracy", "tokenise"]

_LOCK = threading.Lock()


@attrs.frozen
class Example:
    """One validation example as text: the prompt the model reads and the completion it is scored on."""

    prompt: str
    completion: str
    special_tokens: bool = True  # False when the prompt is a chat template's text, which has its own


@attrs.frozen(eq=False)
class TokenisedSet:
    """Examples tokenised once: per example the prompt+completion ids and where the completion starts."""

    ids: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    batch_size: int

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, index: Sequence[int] | None = None) -> int:
        """Tokens the examples at `index` (all when None) make the model read."""
        sel = range(len(self.ids)) if index is None else index
        return sum(len(self.ids[i]) for i in sel)

    def batches(self, index: Sequence[int] | None, pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(input_ids, attention_mask, labels) right-padded batches; labels -100 outside completions."""
        sel = list(range(len(self.ids))) if index is None else list(index)
        for lo in range(0, len(sel), self.batch_size):
            rows = sel[lo : lo + self.batch_size]
            width = max(len(self.ids[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for k, i in enumerate(rows):
                row = torch.tensor(self.ids[i], dtype=torch.long)
                ids[k, : row.numel()] = row
                mask[k, : row.numel()] = 1
                labels[k, self.starts[i] : row.numel()] = row[self.starts[i] :]
            yield ids, mask, labels


def tokenise(tokenizer: Any, examples: Sequence[Example], batch_size: int = 32) -> TokenisedSet:
    """Prompt with the tokenizer's special tokens, completion without; ConfigError naming a bad example."""
    ids, starts = [], []
    for k, ex in enumerate(examples):
        prompt = list(tokenizer(ex.prompt, add_special_tokens=ex.special_tokens)["input_ids"])
        completion = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
        if not prompt:
            raise ConfigError(f"example {k}: the prompt has no tokens")
        if not completion:
            raise ConfigError(f"example {k}: the completion has no tokens")
        ids.append(tuple(prompt + completion))
        starts.append(len(prompt))
    if not ids:
        raise ConfigError("validation data needs at least one example")
    return TokenisedSet(tuple(ids), tuple(starts), batch_size)


_SCORERS: weakref.WeakKeyDictionary[Base, Scorer] = weakref.WeakKeyDictionary()


class Scorer:
    """The base wrapped once by PEFT, the slots, and the forward passes; shared by every session.

    PEFT wraps the base model in place, so a base has one scorer: get it with `Scorer.of(base)`.
    """

    @classmethod
    def of(cls, base: Base) -> Scorer:
        """The scorer of `base` (made on first use)."""
        with _LOCK:
            scorer = _SCORERS.get(base)
            if scorer is None:
                scorer = _SCORERS[base] = cls(base)
            return scorer

    def __init__(self, base: Base) -> None:
        self.base = base
        self.lock = threading.RLock()
        self._peft: Any = None
        self._slots: dict[tuple[int, tuple[str, ...]], str] = {}

    def _slot(self, rank: int, modules: tuple[str, ...]) -> str:
        """The name of the slot adapter for this rank and module set (created on first use)."""
        from peft import LoraConfig, get_peft_model

        key = (rank, modules)
        name = self._slots.get(key)
        if name is not None:
            return name
        name = f"slot-{len(self._slots)}"
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(modules), lora_dropout=0.0, bias="none"
        )
        if self._peft is None:
            self._peft = get_peft_model(self.base.model, config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
        self._peft.eval()
        self._peft.requires_grad_(False)
        self._slots[key] = name
        return name

    def write(self, pool: AdapterPool, alpha: ArrayLike, beta: ArrayLike, form: MergeForm) -> str:
        """Merge (alpha, beta) into the slot in place and make it the active adapter; hold `lock`."""
        rank = pool.rank * (len(pool) if form == "cat" else 1)
        name = self._slot(rank, pool.modules)
        model = self._peft.base_model.model
        with torch.inference_mode():
            for m in pool.modules:
                a_m, b_m = merge_module(pool.a[m], pool.b[m], pool.order_ranks[m], alpha, beta, form)
                layer = model.get_submodule(m)
                layer.lora_A[name].weight.copy_(a_m)
                layer.lora_B[name].weight.copy_(b_m)
        self._peft.set_adapter(name)
        return name

    @contextmanager
    def merged(self, pool: AdapterPool, alpha: ArrayLike, beta: ArrayLike, form: MergeForm) -> Iterator[Any]:
        """The model with the merge active, for as long as the block holds the lock."""
        with self.lock:
            self.write(pool, alpha, beta, form)
            yield self._peft

    @contextmanager
    def plain(self) -> Iterator[Any]:
        """The base model alone (adapters off)."""
        with self.lock:
            if self._peft is None:
                yield self.base.model
            else:
                with self._peft.disable_adapter():
                    yield self._peft

    def loss(self, model: Any, data: TokenisedSet, index: Sequence[int] | None = None) -> tuple[float, int]:
        """(mean token cross-entropy on completion tokens, tokens read) of `model` on the examples."""
        total = 0.0
        count = 0
        pad = int(self.base.tokenizer.pad_token_id)
        dev = self.base.device
        with torch.inference_mode():
            for ids, mask, labels in data.batches(index, pad):
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1, :]
                target = labels[:, 1:].to(dev)
                ce = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                    ignore_index=-100,
                )  # fmt: skip
                total += float(ce)
                count += int((target != -100).sum())
        return total / count, data.tokens(index)

    def next_token_logprobs(self, model: Any, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Log-probabilities of the next token after a prompt (float32, on the CPU)."""
        with torch.inference_mode():
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.base.device)
            logits = model(input_ids=ids).logits[0, -1, :].float()
            return torch.log_softmax(logits, dim=-1).cpu()


def first_token_accuracy(scorer: Scorer, model: Any, data: TokenisedSet, answer_ids: ArrayLike) -> float:
    """Share of examples whose first completion token is the answer-set token the model ranks highest."""
    answers = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long)
    right = 0
    pad = int(scorer.base.tokenizer.pad_token_id)
    with torch.inference_mode():
        for ids, mask, labels in data.batches(None, pad):
            logits = model(
                input_ids=ids.to(scorer.base.device), attention_mask=mask.to(scorer.base.device)
            ).logits
            for k in range(ids.shape[0]):
                start = int((labels[k] != -100).nonzero()[0])
                row = logits[k, start - 1, answers].float()
                right += int(answers[int(row.argmax())] == ids[k, start])
    return right / len(data)
