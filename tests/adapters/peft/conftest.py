"""The real-format world for the PEFT tests: built once, cached in pytest's own cache folder of this
checkout (keyed by the world's config hash and code version), never in the user's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from evomerge_peft import Base, Example, TokenisedSet, World, build_world, load_base, tokenise


@pytest.fixture(scope="session")
def world(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> World:
    """The CI-sized world, own-seed adapters (each A from its own initialisation); built in a temporary
    folder when pytest runs without its cache (`-p no:cacheprovider`)."""
    torch.set_num_threads(1)  # 2 shared cores: one thread is the fastest for a model this size
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    root = cache.mkdir("evomerge-peft-worlds") if cache is not None else tmp_path_factory.mktemp("worlds")
    return build_world(root=root)


@pytest.fixture(scope="session")
def base(world: World) -> Base:
    """The world's base, loaded once (float32, CPU). Tests that wrap it share the scorer below."""
    return load_base(world.base)


def examples(path: Path) -> list[Example]:
    """The examples of a JSONL file of {"prompt", "completion"} lines."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [Example(r["prompt"], r["completion"]) for r in rows]


@pytest.fixture(scope="session")
def validation(world: World, base: Base) -> TokenisedSet:
    """The first target's validation set, tokenised."""
    return tokenise(base.tokenizer, examples(world.data(world.targets[0], "validation")))
