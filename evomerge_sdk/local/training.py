"""Training of the embedded repository: base pre-training, then every LoRA adapter at once.

Both use minibatch Adam in float32. Adapters train *vectorised*: the K adapters' minibatches go through
the frozen base weights as one stacked matrix product, and only the rank-r LoRA paths are per-adapter
batched products, so 110 adapters train in about the time of a few single ones.

LoRA follows PEFT's defaults: B starts at zero, A from a uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) draw,
the update is scaled by s = lora_alpha / r, and A and B share one learning rate. The A initialisation
is whatever the caller passes: the repository gives every hub adapter the same one (its recipe fixes the
seed), which is what keeps parameter merges meaningful (DESIGN 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from .._types import Float32Array, IntArray
from ..errors import ConfigError

__all__ = ["Adam", "AdapterBatch", "pretrain_base", "train_adapters", "uniform_init"]


class Adam:
    """Adam over a dict of float32 arrays, updated in place; `lr` may be an array per parameter."""

    def __init__(
        self, params: dict[str, Float32Array], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
    ):
        self.params = params
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict[str, Float32Array], lr: float) -> None:
        """One update of every parameter that has a gradient."""
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            self.params[k] -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> Float32Array:
    """PEFT's default A initialisation: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _log_softmax32(z: Float32Array) -> Float32Array:
    z = z - z.max(axis=-1, keepdims=True)
    out: Float32Array = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def pretrain_base(
    ids: IntArray,
    targets: IntArray,
    *,
    vocab_size: int,
    embed_dim: int,
    hidden_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
) -> dict[str, Float32Array]:
    """Pre-train the base network on fixed-length prompts `ids` with next-token `targets`.

    Returns float32 weights named like `ModelWeights` fields.
    """
    n, length = ids.shape
    if targets.shape != (n,) or steps < 1 or batch_size < 1:
        raise ConfigError("pre-training needs one target per prompt, steps >= 1 and batch_size >= 1")
    v, e, h = vocab_size, embed_dim, hidden_dim
    p: dict[str, Float32Array] = {
        "embedding": (0.1 * rng.standard_normal((v, e))).astype(np.float32),
        "w1": (rng.standard_normal((h, e)) / np.sqrt(e)).astype(np.float32),
        "b1": np.zeros(h, np.float32),
        "w2": (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32),
        "b2": np.zeros(h, np.float32),
        "w3": (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32),
        "b3": np.zeros(v, np.float32),
    }
    opt = Adam(p)
    rows = np.repeat(np.arange(batch_size), length)
    inv_len = np.float32(1.0 / length)
    for _ in range(steps):
        pick = rng.integers(0, n, batch_size)
        bag = np.zeros((batch_size, v), np.float32)
        np.add.at(bag, (rows, ids[pick].ravel()), inv_len)
        y = targets[pick]
        emb = bag @ p["embedding"]
        a1 = emb @ p["w1"].T + p["b1"]
        h1 = np.maximum(a1, 0)
        a2 = h1 @ p["w2"].T + p["b2"]
        h2 = np.maximum(a2, 0)
        probs = np.exp(_log_softmax32(h2 @ p["w3"].T + p["b3"]))
        probs[np.arange(batch_size), y] -= 1.0
        g = probs / np.float32(batch_size)
        grads = {"w3": g.T @ h2, "b3": g.sum(0)}
        g2 = (g @ p["w3"]) * (a2 > 0)
        grads |= {"w2": g2.T @ h1, "b2": g2.sum(0)}
        g1 = (g2 @ p["w2"]) * (a1 > 0)
        grads |= {"w1": g1.T @ emb, "b1": g1.sum(0), "embedding": bag.T @ (g1 @ p["w1"])}
        opt.step(grads, lr)
    return p


@attrs.frozen(eq=False)
class AdapterBatch:
    """Training data of K adapters: bag embeddings (K, n_max, E), targets (K, n_max), sizes (K,).

    Adapter k samples its minibatches from its first `sizes[k]` examples only.
    """

    embeddings: Float32Array
    targets: IntArray
    sizes: IntArray

    def __attrs_post_init__(self) -> None:
        """Cross-field invariant: the three arrays agree on adapters and examples, sizes within them."""
        k, n = self.targets.shape
        if self.embeddings.shape[:2] != (k, n) or self.sizes.shape != (k,):
            raise ConfigError("embeddings, targets and sizes disagree on the number of adapters/examples")
        if self.sizes.min() < 1 or self.sizes.max() > n:
            raise ConfigError(f"every adapter needs between 1 and {n} training examples")


def train_adapters(
    base: dict[str, Float32Array],
    data: AdapterBatch,
    a_init: Sequence[Float32Array],
    *,
    scale: float,
    steps: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
) -> tuple[list[Float32Array], list[Float32Array]]:
    """Train K LoRA adapters (on W1, W2, W3) at once; returns the stacked A's and B's.

    `a_init[j]` holds each adapter's initial A for matrix j, shape (K, r, in_j). B starts at zero.
    """
    k_count = data.targets.shape[0]
    w = [base["w1"], base["w2"], base["w3"]]
    b_bias = [base["b1"], base["b2"], base["b3"]]
    if len(a_init) != 3 or any(
        a.shape[0] != k_count or a.shape[2] != wj.shape[1] for a, wj in zip(a_init, w, strict=True)
    ):
        raise ConfigError("a_init must hold one (K, r, in) array per adapted matrix")
    params: dict[str, Float32Array] = {}
    for j, (a, wj) in enumerate(zip(a_init, w, strict=True)):
        params[f"a{j}"] = np.array(a, dtype=np.float32)
        params[f"b{j}"] = np.zeros((k_count, wj.shape[0], a.shape[1]), np.float32)
    opt = Adam(params)
    s = np.float32(scale)
    kk = np.arange(k_count)[:, None]
    bb = np.arange(batch_size)[None, :]

    def t(x: Float32Array) -> Float32Array:
        out: Float32Array = x.transpose(0, 2, 1)
        return out

    for _ in range(steps):
        pick = (rng.random((k_count, batch_size)) * data.sizes[:, None]).astype(np.int64)
        x = data.embeddings[kk, pick]
        y = data.targets[kk, pick]
        inputs, pre, codes = [], [], []
        for j in range(3):
            code = x @ t(params[f"a{j}"])
            z = x @ w[j].T + b_bias[j] + s * (code @ t(params[f"b{j}"]))
            inputs.append(x)
            codes.append(code)
            pre.append(z)
            x = np.maximum(z, 0) if j < 2 else z
        probs = np.exp(_log_softmax32(pre[2]))
        probs[kk, bb, y] -= 1.0
        g = probs / np.float32(batch_size)
        grads: dict[str, Float32Array] = {}
        for j in (2, 1, 0):
            grads[f"b{j}"] = s * (t(g) @ codes[j])
            g_code = s * (g @ params[f"b{j}"])
            grads[f"a{j}"] = t(g_code) @ inputs[j]
            if j > 0:
                g = (g @ w[j] + g_code @ params[f"a{j}"]) * (pre[j - 1] > 0)
        opt.step(grads, lr)
    return [params[f"a{j}"] for j in range(3)], [params[f"b{j}"] for j in range(3)]
