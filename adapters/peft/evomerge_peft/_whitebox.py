"""White-box baselines on real weights: PEFT's own `add_weighted_adapter`, called, never rewritten.

PEFT merges adapters it has loaded by name (linear, cat, ties, dare_linear, magnitude_prune, ...). This
module loads the pool into a fresh copy of the base, asks PEFT for the merge, and saves only the merged
adapter as a PEFT folder, which the service then scores like any other adapter (`load_pool` of one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evomerge_sdk.errors import ConfigError

__all__ = ["PEFT_COMBINATIONS", "peft_weighted_merge"]

PEFT_COMBINATIONS = ("linear", "cat", "ties", "dare_linear", "magnitude_prune")
"""The combination types the benchmark compares (PEFT offers more, e.g. the SVD variants)."""


def peft_weighted_merge(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    weights: Sequence[float],
    combination_type: str,
    out_dir: str | Path,
    *,
    density: float | None = None,
    seed: int = 0,
) -> Path:
    """The folder of PEFT's `add_weighted_adapter` merge of `adapters` (DARE's drops drawn from `seed`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    names = list(adapters)
    if len(weights) != len(names):
        raise ConfigError(f"got {len(weights)} weights for {len(names)} adapters")
    if combination_type not in PEFT_COMBINATIONS:
        raise ConfigError(f"combination_type must be one of {PEFT_COMBINATIONS}, got {combination_type!r}")
    hf_logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(Path(base_dir), local_files_only=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, Path(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(adapters[name]), adapter_name=name)
    kwargs = {} if density is None else {"density": density}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_weighted_adapter(
            names, [float(w) for w in weights], "merged", combination_type=combination_type, **kwargs
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".peft-merge-"))
    try:
        model.save_pretrained(tmp, selected_adapters=["merged"])
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "merged", out)  # PEFT saves a named adapter in a sub-folder of that name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
