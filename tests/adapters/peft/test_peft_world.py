"""The real-format world: real transformers and PEFT files, both adapter variants, cached by config hash."""

from __future__ import annotations

import json

import torch
from evomerge_peft import World, WorldConfig, build_world
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_world_is_real_files_that_transformers_and_peft_load(world: World) -> None:
    tokenizer = AutoTokenizer.from_pretrained(world.base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(world.base, local_files_only=True)
    assert model.config.model_type == "llama"
    target = world.targets[0]
    line = json.loads(world.data(target, "validation").read_text().splitlines()[0])
    ids = tokenizer(line["prompt"])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": line["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(chat, add_special_tokens=False)["input_ids"] == ids  # chats read as the plain prompts
    adapter = PeftModel.from_pretrained(model, world.adapters[target])
    config = json.loads((world.adapters[target] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == world.config.rank
    assert any(isinstance(p, torch.Tensor) for p in adapter.parameters())


def test_world_has_every_role_and_out_of_domain_pools(world: World) -> None:
    assert set(world.roles.values()) == {"specialist", "harmful", "irrelevant"}
    for target in world.targets:
        pool = world.pool(target)
        assert target not in pool and len(pool) == len(world.adapters) - 1
        assert f"{target}-inverted" not in pool  # no negated twin of the target's specialist


def test_world_is_cached_by_config(world: World) -> None:
    stamp = (world.adapters[world.targets[0]] / "adapter_model.safetensors").stat().st_mtime_ns
    again = build_world(world.config, root=world.root.parent)
    assert again.root == world.root
    assert (again.adapters[world.targets[0]] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert WorldConfig(seed=1).key() != world.config.key()


def _first_a(world: World, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(world.adapters[name] / "adapter_model.safetensors"))
    return next(v for k, v in sorted(tensors.items()) if k.endswith("lora_A.weight")).flatten()


def test_variants_share_or_separate_the_initial_a(tmp_path: object) -> None:
    # A miniature world (seconds): the shared-seed variant starts every A equal, the own-seed one does not.
    tiny = WorldConfig(types=1, domains=2, hidden=16, layers=1, pretrain_steps=3, adapter_steps=2,
                       validation=4, held_out=4, test=4)  # fmt: skip
    cos = {}
    for variant in ("shared_seed", "own_seed"):
        w = build_world(tiny, root=tmp_path, variant=variant)  # type: ignore[arg-type]
        names = sorted(w.adapters)
        a, b = _first_a(w, names[0]), _first_a(w, names[1])
        cos[variant] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cos["shared_seed"] > 0.9
    assert abs(cos["own_seed"]) < 0.5
