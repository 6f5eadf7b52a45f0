"""Scoring in the preallocated slot: the same losses as plain PEFT, in place, completion tokens only;
materialised merges reload with plain PEFT to the same loss; PEFT's own merges load as adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evomerge_peft import (
    PEFT_COMBINATIONS,
    AdapterPool,
    Base,
    Example,
    Scorer,
    TokenisedSet,
    World,
    load_base,
    load_pool,
    peft_weighted_merge,
    tokenise,
    write_adapter,
)  # fmt: skip
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def scorer(base: Base) -> Scorer:
    return Scorer.of(base)


@pytest.fixture(scope="module")
def pool(world: World, base: Base) -> AdapterPool:
    return load_pool(base, world.pool(world.targets[0]))


def _plain_peft(world: World, folder: Path) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(world.base, local_files_only=True)
    return PeftModel.from_pretrained(model, folder).eval()


def test_one_hot_merge_is_the_adapter_as_peft_loads_it(world: World, scorer: Scorer, pool: AdapterPool,
                                                     validation: TokenisedSet) -> None:  # fmt: skip
    n = len(pool)
    for i in (0, n - 1):
        beta = np.zeros(n)
        beta[i] = 1.0
        for form in ("paper", "cat"):
            with scorer.merged(pool, np.ones(n), beta, form) as model:
                loss, tokens = scorer.loss(model, validation)
            want, _ = scorer.loss(_plain_peft(world, pool.paths[i]), validation)
            assert abs(loss - want) < 1e-5
            assert tokens == sum(len(ids) for ids in validation.ids)


def test_candidates_are_written_in_place(scorer: Scorer, pool: AdapterPool, validation: TokenisedSet) -> None:
    rng = np.random.default_rng(0)
    n = len(pool)
    scorer.write(pool, rng.uniform(size=n), rng.uniform(-1, 1, n), "paper")
    model = scorer._peft
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    modules = len(list(model.modules()))
    losses = []
    for _ in range(3):
        alpha, beta = rng.uniform(size=n), rng.uniform(-1, 1, n)
        with scorer.merged(pool, alpha, beta, "paper") as m:
            losses.append(scorer.loss(m, validation)[0])
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    assert len(list(model.modules())) == modules
    assert len(set(losses)) == 3


def test_loss_counts_completion_tokens_only(world: World, base: Base, scorer: Scorer) -> None:
    ex = Example("ner: g1 g2 g3 news1 news2 news3 ?", " red")
    data = tokenise(base.tokenizer, [ex])
    with scorer.plain() as model:
        loss, _ = scorer.loss(model, data)
        ids = torch.tensor([list(data.ids[0])])
        logits = model(input_ids=ids).logits[0, -2].float()
    assert abs(loss - float(-torch.log_softmax(logits, -1)[ids[0, -1]])) < 1e-6
    two = tokenise(base.tokenizer, [ex, Example("ner: g4 ?", " blue")], batch_size=2)
    with scorer.plain() as model:  # padding of a shorter neighbour changes nothing
        assert abs(scorer.loss(model, two, [0])[0] - loss) < 1e-6


def test_minibatch_scores_the_chosen_examples(world: World, base: Base, scorer: Scorer, pool: AdapterPool,
                                             validation: TokenisedSet) -> None:  # fmt: skip
    idx = [1, 5, 9, 30]
    lines = world.data(world.targets[0], "validation").read_text().splitlines()
    rows = [Example(**json.loads(line)) for line in lines]
    subset = tokenise(base.tokenizer, [rows[i] for i in idx])
    n = len(pool)
    with scorer.merged(pool, np.full(n, 0.7), np.full(n, 1 / n), "paper") as model:
        part, tokens = scorer.loss(model, validation, idx)
        assert tokens == subset.tokens()
        assert abs(part - scorer.loss(model, subset)[0]) < 1e-6


def test_bfloat16_on_cpu(world: World, validation: TokenisedSet) -> None:
    half = load_base(world.base, dtype="bfloat16")
    scorer = Scorer.of(half)
    pool = load_pool(half, world.pool(world.targets[0]))
    n = len(pool)
    with scorer.merged(pool, np.ones(n), np.full(n, 1 / n), "paper") as model:
        low, _ = scorer.loss(model, validation)
    full = load_base(world.base)
    ref = Scorer.of(full)
    with ref.merged(
        load_pool(full, world.pool(world.targets[0])), np.ones(n), np.full(n, 1 / n), "paper"
    ) as m:
        high, _ = ref.loss(m, validation)
    assert abs(low - high) < 0.05 * high


@pytest.mark.parametrize("form", ["paper", "cat"])
def test_materialised_merge_reloads_with_plain_peft(form: str, world: World, base: Base, scorer: Scorer,
                                                    pool: AdapterPool, validation: TokenisedSet,
                                                    tmp_path: Path) -> None:  # fmt: skip
    rng = np.random.default_rng(1)
    n = len(pool)
    alpha, beta = rng.uniform(0.2, 1, n), rng.uniform(-0.6, 0.9, n)
    with scorer.merged(pool, alpha, beta, form) as model:  # type: ignore[arg-type]
        served, _ = scorer.loss(model, validation)
    folder = write_adapter(tmp_path / "merged", base, pool, alpha, beta, form, {"form": form})  # type: ignore[arg-type]
    reloaded, _ = scorer.loss(_plain_peft(world, folder), validation)
    assert abs(reloaded - served) < 1e-4
    _check_vllm_loadable(folder, pool.rank * (n if form == "cat" else 1))


LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head"}  # fmt: skip
"""vLLM's Llama LoRA target modules (its packed qkv_proj / gate_up_proj are built from these)."""


def _check_vllm_loadable(folder: Path, rank: int) -> None:
    """What vLLM's loader (vllm/lora/peft_helper.py, lora_model.py) reads and refuses, on the files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config)  # PEFTHelper's required fields
    assert config["r"] == rank and isinstance(config["r"], int)
    assert config["lora_alpha"] == rank  # scaling 1: the pool's scales are in the weights
    assert not config.get("use_rslora") and not config.get("use_dora") and not config.get("lora_bias")
    assert config.get("bias", "none") == "none" and not config.get("modules_to_save")
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert not config.get("layer_replication") and config.get("init_lora_weights", True) is True
    assert set(config["target_modules"]) <= LLAMA_LORA_MODULES
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for key, tensor in tensors.items():
        parts = key.split(".")
        # parse_fine_tuned_lora_name: base_model.model.<module>.lora_A|lora_B.weight
        assert (
            parts[:2] == ["base_model", "model"]
            and parts[-1] == "weight"
            and parts[-2] in ("lora_A", "lora_B")
        )
        assert parts[-3] in config["target_modules"]  # check_unexpected_modules reads the last name
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert (tensor.shape[0] if parts[-2] == "lora_A" else tensor.shape[1]) == rank


@pytest.mark.parametrize("combination", PEFT_COMBINATIONS)
def test_peft_weighted_merges_load_as_adapters(combination: str, world: World, base: Base, scorer: Scorer,
                                              validation: TokenisedSet, tmp_path: Path) -> None:  # fmt: skip
    adapters = dict(list(world.pool(world.targets[0]).items())[:3])
    density = 0.5 if combination in ("ties", "dare_linear", "magnitude_prune") else None
    folder = peft_weighted_merge(world.base, adapters, [0.4, 0.3, 0.3], combination, tmp_path / "m",
                                 density=density)  # fmt: skip
    merged = load_pool(base, {combination: folder})
    with scorer.merged(merged, [1.0], [1.0], "paper") as model:
        loss, _ = scorer.loss(model, validation)
    assert np.isfinite(loss)
    assert merged.rank == (12 if combination == "cat" else 4)


def test_peft_linear_merge_of_one_adapter_is_that_adapter(
    world: World, base: Base, scorer: Scorer, validation: TokenisedSet, tmp_path: Path
) -> None:
    name = world.targets[1]
    folder = peft_weighted_merge(world.base, {name: world.adapters[name]}, [1.0], "linear", tmp_path / "one")
    merged = load_pool(base, {"one": folder})
    with scorer.merged(merged, [1.0], [1.0], "paper") as model:
        loss, _ = scorer.loss(model, validation)
    want, _ = scorer.loss(_plain_peft(world, world.adapters[name]), validation)
    assert abs(loss - want) < 1e-5
