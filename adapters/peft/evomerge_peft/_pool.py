"""Loading a base model folder and a pool of PEFT LoRA adapter folders on it, with every check up front.

A pool is all or nothing: each adapter is read and checked completely (config, weights, fit to the base)
before the pool exists, and every failure is a `ConfigError` naming the adapter and the file. What is
refused, and why:

- a folder that does not exist (never a hub name: this backend reads local folders only);
- a missing or unreadable `adapter_config.json`, or one that is not a LoRA config (`peft_type` other than
  LORA), or LoRA features the merge operator has no meaning for (DoRA, biases, `modules_to_save`,
  per-layer rank or alpha patterns, `fan_in_fan_out` Conv1D layouts);
- a missing or corrupt `adapter_model.safetensors` (the pickle-based `adapter_model.bin` is refused:
  loading it would execute code from the file), keys that are not `lora_A`/`lora_B` weights of a module,
  a module without both halves, shapes that disagree with the config's rank;
- an adapter for another base: a module the base does not have or whose shape differs;
- a pool whose adapters differ in target modules or in rank. Ranks are refused rather than zero-padded:
  padding changes the size S(A, alpha) keeps a fraction of, so the paper's operator would mean something
  else for the padded adapters.

Each adapter's own scaling is honoured: s_i = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`.
The pool stores sqrt(s_i) * A_i and sqrt(s_i) * B_i, so that B_i A_i carries s_i exactly and a merge of
the stored pairs is the merge of the scaled updates; the merged adapter then has scaling 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from evomerge_sdk.engine import magnitude_order
from evomerge_sdk.errors import ConfigError

__all__ = ["AdapterPool", "Base", "load_base", "load_pool"]

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_REFUSED = {
    "use_dora": (True, "DoRA adapters are not supported (their magnitude vectors do not merge)"),
    "fan_in_fan_out": (True, "fan_in_fan_out (Conv1D) adapters are not supported"),
}
_MUST_BE_EMPTY = ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_folder(path: str | Path, what: str) -> Path:
    """A path that must be an existing local folder: this backend never resolves hub names."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{what} {str(path)!r} is not a local folder (this backend reads local folders only and never "
            "downloads from a model hub)"
        )
    return folder.resolve()


@attrs.frozen(eq=False)
class Base:
    """A loaded base causal LM, its tokenizer and where it came from; shared by every pool and session."""

    path: Path
    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    linear_shapes: dict[str, tuple[int, int]]  # (out, in) of every nn.Linear, read before PEFT wraps it


def load_base(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> Base:
    """The base model and tokenizer of a local folder, in eval mode on `device` with `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device here")
    folder = _local_folder(path, "base model")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base model folder {str(folder)!r} has no config.json")
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=_DTYPES[dtype])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"base model folder {str(folder)!r} does not load: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id does
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return Base(folder, model, tokenizer, dev, _DTYPES[dtype], shapes)


@attrs.frozen(eq=False)
class _Adapter:
    name: str
    path: Path
    rank: int
    scale: float
    a: dict[str, torch.Tensor]  # module -> (r, in), float32
    b: dict[str, torch.Tensor]  # module -> (out, r), float32


def _read_config(name: str, folder: Path) -> tuple[int, float]:
    """The adapter's (rank, scale) after every config check."""
    path = folder / "adapter_config.json"
    where = f"adapter {name!r}: {path}"
    if not path.is_file():
        raise ConfigError(f"{where} is missing (is {str(folder)!r} a PEFT adapter folder?)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must hold a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{where}: unsupported PEFT type {peft_type!r}; only LORA adapters merge here")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{where}: r must be a positive integer, got {rank!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ConfigError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    for key, (bad, why) in _REFUSED.items():
        if cfg.get(key) == bad:
            raise ConfigError(f"{where}: {why}")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{where}: bias={cfg.get('bias')!r} is not supported (LoRA biases do not merge)")
    for key in _MUST_BE_EMPTY:
        if cfg.get(key):
            raise ConfigError(f"{where}: {key} is not supported (got {cfg[key]!r})")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ConfigError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
    return rank, scale


def _read_weights(
    name: str, folder: Path, rank: int, shapes: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's A and B per module, checked against its rank and the base's module shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    where = f"adapter {name!r}: {path}"
    if not path.is_file():
        hint = (
            " (adapter_model.bin is refused: unpickling runs code from the file)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise ConfigError(f"{where} is missing{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{where} is not a readable safetensors file: {exc}") from None
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ConfigError(f"{where}: key {key!r} is not a LoRA A/B weight of a module (unsupported)")
        module = match["module"]
        if module not in shapes:
            raise ConfigError(
                f"{where}: module {module!r} is not a linear layer of the base (an adapter for another base?)"
            )
        out_f, in_f = shapes[module]
        want = (rank, in_f) if match["half"] == "A" else (out_f, rank)
        if tuple(tensor.shape) != want:
            raise ConfigError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, expected {want} (rank {rank} on the "
                f"base's {out_f}x{in_f} layer; an adapter for another base?)"
            )
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{where}: {key} holds non-finite values")
        (a if match["half"] == "A" else b)[module] = tensor.to(torch.float32)
    if not a:
        raise ConfigError(f"{where} holds no LoRA weights")
    if set(a) != set(b):
        odd = sorted(set(a) ^ set(b))
        raise ConfigError(f"{where}: modules {odd[:3]} lack lora_A or lora_B")
    return a, b


def _read_adapter(name: str, path: str | Path, shapes: Mapping[str, tuple[int, int]]) -> _Adapter:
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"adapter names must be non-empty strings without '/', got {name!r}")
    folder = _local_folder(path, f"adapter {name!r}: folder")
    rank, scale = _read_config(name, folder)
    a, b = _read_weights(name, folder, rank, shapes)
    return _Adapter(name, folder, rank, scale, a, b)


@attrs.frozen(eq=False)
class AdapterPool:
    """N LoRA adapters on one base, stacked per module for the merge operator.

    `a[m]` is (N, r, in) and `b[m]` (N, out, r), float32 on the base's device, each adapter's scaling
    folded in (sqrt(s_i) on both halves); `order_ranks[m]` (N, r*in) is each entry's position in its
    adapter's magnitude order (0 = largest), computed once with the engine's `magnitude_order`.
    """

    names: tuple[str, ...]
    paths: tuple[Path, ...]
    rank: int
    scales: tuple[float, ...]
    modules: tuple[str, ...]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    order_ranks: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.names)

    def target_names(self) -> list[str]:
        """The modules' last names (q_proj, ...), the `target_modules` a PEFT config lists."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


def _order_ranks(stack: torch.Tensor) -> torch.Tensor:
    """Each entry's position in its adapter's `magnitude_order` (the SDK's own, so ties agree)."""
    flat = stack.reshape(stack.shape[0], -1).cpu().numpy().astype(np.float64)
    ranks = np.empty(flat.shape, dtype=np.int64)
    positions = np.arange(flat.shape[1], dtype=np.int64)
    for i in range(flat.shape[0]):
        ranks[i, magnitude_order(flat[i])] = positions
    return torch.from_numpy(ranks)


def load_pool(base: Base, adapters: Mapping[str, str | Path]) -> AdapterPool:
    """Read, check and stack the adapters {name: folder} on `base`; nothing exists unless all load."""
    if not isinstance(adapters, Mapping) or not adapters:
        raise ConfigError("a pool needs at least one adapter: {name: folder}")
    shapes = base.linear_shapes
    loaded = [_read_adapter(name, path, shapes) for name, path in adapters.items()]
    first = loaded[0]
    for ad in loaded[1:]:
        if ad.rank != first.rank:
            raise ConfigError(
                f"adapter {ad.name!r}: {ad.path / 'adapter_config.json'} has rank {ad.rank} but "
                f"{first.name!r} has {first.rank}; a pool must share one rank (mixed ranks are refused, not "
                "zero-padded: see evomerge_peft's pool documentation)"
            )
        if set(ad.a) != set(first.a):
            extra = sorted(set(ad.a) - set(first.a))[:3]
            missing = sorted(set(first.a) - set(ad.a))[:3]
            raise ConfigError(
                f"adapter {ad.name!r}: {ad.path / 'adapter_model.safetensors'} targets other modules than "
                f"{first.name!r} (extra {extra}, missing {missing}); a pool must share its target modules"
            )
    modules = tuple(sorted(first.a))
    root = [math.sqrt(ad.scale) for ad in loaded]
    a = {m: torch.stack([ad.a[m] * r for ad, r in zip(loaded, root, strict=True)]) for m in modules}
    b = {m: torch.stack([ad.b[m] * r for ad, r in zip(loaded, root, strict=True)]) for m in modules}
    order = {m: _order_ranks(torch.stack([ad.a[m] for ad in loaded])) for m in modules}
    dev = base.device
    return AdapterPool(
        names=tuple(ad.name for ad in loaded),
        paths=tuple(ad.path for ad in loaded),
        rank=first.rank,
        scales=tuple(ad.scale for ad in loaded),
        modules=modules,
        a={m: t.to(dev) for m, t in a.items()},
        b={m: t.to(dev) for m, t in b.items()},
        order_ranks={m: t.to(dev) for m, t in order.items()},
    )
