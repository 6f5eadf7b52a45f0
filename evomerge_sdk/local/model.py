"""The embedded base language model: a bag of prompt tokens in, a next-token distribution out.

    e = mean of the prompt's token embeddings          (embedding: vocab x E, not adapted)
    h1 = relu(W1 e + b1)      h2 = relu(W2 h1 + b2)      logits = W3 h2 + b3   (over the whole vocabulary)

LoRA adapters change W1, W2 and W3 (`LORA_MATRICES`): W_k + s * B_k @ A_k with s = lora_alpha / r.
Weights are held in float64, so merges are exact; the forward pass computes in float32 (numpy's float32
exp is several times faster), which puts a forward pass over 300 prompts well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
from numpy.typing import NDArray

from .._types import FloatArray, IntArray
from ..errors import ConfigError

__all__ = ["LORA_MATRICES", "LoraAdapter", "ModelWeights", "bag_embeddings", "forward_logits", "log_softmax"]


LORA_MATRICES = ("w1", "w2", "w3")
"""The weight matrices LoRA adapts, in the order every (A, B) tuple follows."""


def _f64(x: NDArray[np.floating]) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    arr.setflags(write=False)
    return arr


@attrs.frozen(eq=False)
class ModelWeights:
    """All weights of the network; a merged model is the base with updated W1, W2, W3."""

    embedding: FloatArray = attrs.field(converter=_f64)
    w1: FloatArray = attrs.field(converter=_f64)
    b1: FloatArray = attrs.field(converter=_f64)
    w2: FloatArray = attrs.field(converter=_f64)
    b2: FloatArray = attrs.field(converter=_f64)
    w3: FloatArray = attrs.field(converter=_f64)
    b3: FloatArray = attrs.field(converter=_f64)

    def __attrs_post_init__(self) -> None:
        """Cross-field invariant: every matrix fits the embedding's vocabulary and W1's hidden size."""
        v, e = self.embedding.shape
        h = self.w1.shape[0]
        expected = {"w1": (h, e), "b1": (h,), "w2": (h, h), "b2": (h,), "w3": (v, h), "b3": (v,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ConfigError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return int(self.embedding.shape[0])

    def matrices(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """W1, W2, W3: the matrices LoRA adapts."""
        return self.w1, self.w2, self.w3

    def with_deltas(self, deltas: Sequence[FloatArray]) -> ModelWeights:
        """These weights with W_k + deltas[k] for the adapted matrices."""
        if len(deltas) != len(LORA_MATRICES):
            raise ConfigError(f"need {len(LORA_MATRICES)} weight updates, got {len(deltas)}")
        updated = {
            name: getattr(self, name) + np.asarray(d, dtype=np.float64)
            for name, d in zip(LORA_MATRICES, deltas, strict=True)
        }
        return attrs.evolve(self, **updated)


@attrs.frozen(eq=False)
class LoraAdapter:
    """One adapter's LoRA pairs (A_k: r x in, B_k: out x r) for W1, W2, W3, and its scale s."""

    name: str
    a: tuple[FloatArray, FloatArray, FloatArray]
    b: tuple[FloatArray, FloatArray, FloatArray]
    scale: float

    @property
    def rank(self) -> int:
        """LoRA rank r."""
        return int(self.a[0].shape[0])

    def deltas(self) -> list[FloatArray]:
        """The weight updates s * B_k @ A_k."""
        return [self.scale * (b @ a) for a, b in zip(self.a, self.b, strict=True)]


def log_softmax(z: NDArray[np.floating]) -> NDArray[np.floating]:
    """Row-wise log-softmax in z's dtype, stable for large logits."""
    shifted = z - z.max(axis=-1, keepdims=True)
    out: NDArray[np.floating] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def bag_embeddings(embedding: NDArray[np.floating], ids: IntArray, lengths: IntArray) -> NDArray[np.floating]:
    """Mean embedding of each prompt's first `lengths[i]` tokens (the rest is padding), in the
    embedding's dtype."""
    if ids.ndim != 2 or lengths.shape != (ids.shape[0],):
        raise ConfigError(
            f"ids must be (prompts, length) with one length each, got {ids.shape}, {lengths.shape}"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= embedding.shape[0]):
        raise ConfigError(f"token ids must lie in [0, {embedding.shape[0]})")
    if lengths.size and (lengths.min() < 1 or lengths.max() > ids.shape[1]):
        raise ConfigError("every prompt needs between 1 and ids.shape[1] tokens")
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(embedding.dtype)
    summed = np.einsum("nl,nle->ne", mask, embedding[ids])
    out: NDArray[np.floating] = summed / lengths[:, None].astype(embedding.dtype)
    return out


def forward_logits(weights: ModelWeights, ids: IntArray, lengths: IntArray) -> NDArray[np.float32]:
    """Next-token logits over the vocabulary for each prompt, computed in float32."""

    def f32(x: FloatArray) -> NDArray[np.float32]:
        return x.astype(np.float32)

    e = bag_embeddings(f32(weights.embedding), ids, lengths)
    h1 = np.maximum(e @ f32(weights.w1).T + f32(weights.b1), np.float32(0))
    h2 = np.maximum(h1 @ f32(weights.w2).T + f32(weights.b2), np.float32(0))
    out: NDArray[np.float32] = h2 @ f32(weights.w3).T + f32(weights.b3)
    return out
