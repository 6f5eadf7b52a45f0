"""Pool loading: every bad input of issue 14 item 2 is a clear error naming the adapter and the file,
nothing is half-loaded, and each adapter's lora_alpha / r (or rsLoRA) scaling is honoured."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from evomerge_peft import Base, Scorer, TokenisedSet, World, load_base, load_pool
from safetensors.torch import load_file, save_file

from evomerge_sdk.errors import ConfigError


def _copy(world: World, tmp_path: Path, name: str, edit: Callable[[Path], None] | None = None) -> Path:
    folder = tmp_path / name
    shutil.copytree(world.adapters[name], folder)
    if edit is not None:
        edit(folder)
    return folder


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return edit


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        save_file(fn(load_file(str(path))), str(path))

    return edit


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _write(name: str, text: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(text)


def _drop_modules(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if ".q_proj." not in k}


def _widen(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # What an adapter trained on a base with a wider hidden size looks like.
    return {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in tensors.items()}


def _rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("model.layers.0.", "model.layers.9."): v for k, v in tensors.items()}


def _foreign_key(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 3)}


def _half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.endswith("q_proj.lora_B.weight")}


def _nan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(tensors)[0]
    return {**tensors, key: torch.full_like(tensors[key], math.nan)}


BAD = {
    "missing config": (_unlink("adapter_config.json"), "adapter_config.json is missing"),
    "corrupt config": (_write("adapter_config.json", b"{not json"), "adapter_config.json is not valid JSON"),
    "config not an object": (_write("adapter_config.json", b"[1]"), "must hold a JSON object"),
    "prefix tuning": (_edit_config(peft_type="PREFIX_TUNING"), "unsupported PEFT type 'PREFIX_TUNING'"),
    "ia3": (_edit_config(peft_type="IA3"), "unsupported PEFT type 'IA3'"),
    "dora": (_edit_config(use_dora=True), "DoRA"),
    "bias": (_edit_config(bias="all"), "bias='all'"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "rank pattern": (_edit_config(rank_pattern={"q_proj": 8}), "rank_pattern"),
    "bad rank": (_edit_config(r=0), "r must be a positive integer"),
    "bad alpha": (_edit_config(lora_alpha="big"), "lora_alpha must be a positive number"),
    "missing weights": (_unlink("adapter_model.safetensors"), "adapter_model.safetensors is missing"),
    "corrupt weights": (
        _write("adapter_model.safetensors", b"\x00garbage" * 8),
        "not a readable safetensors",
    ),
    "pickle weights": (
        lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
        "adapter_model.bin is refused",
    ),
    "another base (shape)": (_edit_tensors(_widen), "another base"),
    "another base (module)": (_edit_tensors(_rename), "not a linear layer of the base"),
    "foreign key": (_edit_tensors(_foreign_key), "is not a LoRA A/B weight"),
    "half a pair": (_edit_tensors(_half), "lack lora_A or lora_B"),
    "non-finite": (_edit_tensors(_nan), "non-finite"),
    "rank disagrees with config": (_edit_config(r=8), "expected"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_naming_adapter_and_file(
    case: str, world: World, base: Base, tmp_path: Path
) -> None:
    edit, message = BAD[case]
    good = world.targets[1]
    bad_name = world.targets[2]
    pool = {good: world.adapters[good], "the-bad-one": _copy(world, tmp_path, bad_name, edit)}
    with pytest.raises(ConfigError, match=message) as info:
        load_pool(base, pool)
    assert "'the-bad-one'" in str(info.value)
    assert str(tmp_path / bad_name) in str(info.value)


def test_pool_level_mismatches_name_the_adapter(world: World, base: Base, tmp_path: Path) -> None:
    first, second = world.targets[0], world.targets[1]
    fewer = _copy(world, tmp_path, second, _edit_tensors(_drop_modules))
    with pytest.raises(
        ConfigError, match=r"'odd'.*targets other modules.*missing \['model\.layers\.0\.self_attn\.q_proj'"
    ):
        load_pool(base, {first: world.adapters[first], "odd": fewer})
    rank8 = tmp_path / "rank8"
    _rank8_adapter(world, rank8)
    with pytest.raises(ConfigError, match=r"'r8'.*rank 8 but .* has 4; .*mixed ranks are refused"):
        load_pool(base, {first: world.adapters[first], "r8": rank8})


def _rank8_adapter(world: World, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.base, local_files_only=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])  # fmt: skip
    get_peft_model(model, lora).save_pretrained(folder)


def test_paths_must_be_local_folders(world: World, base: Base) -> None:
    with pytest.raises(ConfigError, match=r"'meta-llama/Llama-3\.1-8B' is not a local folder.*never"):
        load_base("meta-llama/Llama-3.1-8B")
    with pytest.raises(ConfigError, match="adapter 'x': folder 'org/some-lora' is not a local folder"):
        load_pool(base, {"x": "org/some-lora"})
    with pytest.raises(ConfigError, match="dtype"):
        load_base(world.base, dtype="float8")
    with pytest.raises(ConfigError, match="at least one adapter"):
        load_pool(base, {})


def _loss(base: Base, scorer: Scorer, folder: Path, data: TokenisedSet) -> float:
    pool = load_pool(base, {"a": folder})
    with scorer.merged(pool, [1.0], [1.0], "paper") as model:
        return scorer.loss(model, data)[0]


@pytest.fixture(scope="module")
def scorer(base: Base) -> Scorer:
    return Scorer.of(base)


def test_scaling_is_honoured(world: World, base: Base, scorer: Scorer, validation: TokenisedSet,
                             tmp_path: Path) -> None:  # fmt: skip
    name = world.targets[1]
    original = _loss(base, scorer, world.adapters[name], validation)
    config = json.loads((world.adapters[name] / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    # Twice the lora_alpha with half of B is the same update.
    doubled = _copy(world, tmp_path, name, _edit_config(lora_alpha=2 * alpha))
    _edit_tensors(lambda t: {k: v / 2 if "lora_B" in k else v for k, v in t.items()})(doubled)
    assert abs(_loss(base, scorer, doubled, validation) - original) < 1e-5
    # rsLoRA scales by lora_alpha / sqrt(r): this lora_alpha gives the same scaling as the original.
    rs = tmp_path / "rs"
    shutil.copytree(world.adapters[name], rs)
    _edit_config(use_rslora=True, lora_alpha=alpha / math.sqrt(r))(rs)
    assert abs(_loss(base, scorer, rs, validation) - original) < 1e-5
    # And a different scale changes the loss (the scale is not ignored).
    tripled = _copy(world, tmp_path / "t", name, _edit_config(lora_alpha=3 * alpha))
    assert abs(_loss(base, scorer, tripled, validation) - original) > 1e-3


def test_a_refused_pool_leaves_nothing_behind(world: World, base: Base, scorer: Scorer,
                                              validation: TokenisedSet, tmp_path: Path) -> None:  # fmt: skip
    name = world.targets[1]
    before = _loss(base, scorer, world.adapters[name], validation)
    broken = _copy(world, tmp_path, world.targets[2], _unlink("adapter_model.safetensors"))
    with pytest.raises(ConfigError):
        load_pool(base, {name: world.adapters[name], "broken": broken})
    assert _loss(base, scorer, world.adapters[name], validation) == before
