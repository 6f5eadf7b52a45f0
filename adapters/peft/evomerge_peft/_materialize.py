"""A merge written as a plain PEFT LoRA adapter folder that PEFT and vLLM load.

The folder holds `adapter_config.json` (PEFT's own `LoraConfig`, saved by PEFT) and
`adapter_model.safetensors` with PEFT's key layout (`base_model.model.<module>.lora_A.weight`), plus
`evomerge.json` recording where the merge came from. The pool folds every adapter's scaling into its
weights, so the merged adapter has `lora_alpha == r` (scaling 1, no rsLoRA): PEFT, vLLM and any other
loader that reads lora_alpha / r apply exactly the update the service scored. vLLM's loader also needs:
bias "none", no `modules_to_save`, no DoRA, no rank or alpha patterns, every key a `lora_A`/`lora_B`
weight of a module whose last name the model supports, and a rank within its `--max-lora-rank` (the cat
form's rank is N*r: start vLLM with a large enough `--max-lora-rank`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from numpy.typing import ArrayLike

from ._merge import MergeForm, merge_module
from ._pool import AdapterPool, Base

__all__ = ["merged_tensors", "write_adapter"]


def merged_tensors(
    pool: AdapterPool, alpha: ArrayLike, beta: ArrayLike, form: MergeForm
) -> dict[str, torch.Tensor]:
    """The merged adapter's state dict in PEFT's saved key layout (float32, on the CPU, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for m in pool.modules:
            a_m, b_m = merge_module(pool.a[m], pool.b[m], pool.order_ranks[m], alpha, beta, form)
            out[f"base_model.model.{m}.lora_A.weight"] = a_m.float().cpu().contiguous().clone()
            out[f"base_model.model.{m}.lora_B.weight"] = b_m.float().cpu().contiguous().clone()
    return out


def write_adapter(
    folder: str | os.PathLike[str],
    base: Base,
    pool: AdapterPool,
    alpha: ArrayLike,
    beta: ArrayLike,
    form: MergeForm,
    provenance: dict[str, Any],
) -> Path:
    """Write the merge as a PEFT adapter folder (atomically: built beside it, then renamed into place)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    rank = pool.rank * (len(pool) if form == "cat" else 1)
    short = pool.target_names()
    every = {m for m in base.linear_shapes if m.rsplit(".", 1)[-1] in short}
    # Short names when they pick exactly the pool's modules (what vLLM and PEFT users expect), else full ones.
    targets = short if every == set(pool.modules) else sorted(pool.modules)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
            task_type="CAUSAL_LM", base_model_name_or_path=str(base.path),
        )  # fmt: skip
        config.save_pretrained(str(tmp))
        save_file(merged_tensors(pool, alpha, beta, form), str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        (tmp / "evomerge.json").write_text(json.dumps(provenance, indent=2, sort_keys=True))
        os.chmod(tmp, 0o700)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
