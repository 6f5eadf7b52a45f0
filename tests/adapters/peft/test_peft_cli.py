"""`evomerge-peft` refuses bad arguments with status 2 and a message naming the problem, before serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from evomerge_peft import World
from evomerge_peft.cli import main, pool_folders


def test_bad_arguments_exit_2_naming_the_problem(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = str(world.adapters[world.targets[0]].parent)
    missing = f"v={tmp_path / 'x.jsonl'}"
    cases = [
        (["serve", "--base", "meta-llama/Llama-3.1-8B", "--pool", f"p={adapters}"], "is not a local folder"),
        (["serve", "--base", str(world.base), "--pool", "no-equals-sign"], "--pool takes NAME=PATH"),
        (["serve", "--base", str(world.base), "--pool", f"p={tmp_path}"], "holds no adapter folders"),
        (["serve", "--base", str(world.base), "--pool", f"p={adapters}", "--data", missing], "is not a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_pool_folders_reads_one_adapter_or_a_folder_of_them(world: World) -> None:
    one = world.adapters[world.targets[0]]
    pools = pool_folders([f"a={one}", f"b={one.parent}"])
    assert pools["a"] == {one.name: one}
    assert set(pools["b"]) == set(world.adapters)
