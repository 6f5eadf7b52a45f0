"""A search SIGKILLed at random points resumes from its checkpoint and cache, pays again at most what was
in flight when it died, and ends with exactly the result of an uninterrupted run; damaged or foreign
checkpoints are refused with a clear message."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _resume_driver import POPSIZE, SEARCH

from evomerge_sdk.engine import EvoMerge
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.testing import SyntheticPool

DRIVER = Path(__file__).resolve().parents[1] / "_resume_driver.py"
KILLS = 4
TOKENS_PER_EVALUATION = 720  # the small repository's ood:ner/news validation set, as the server bills it


def _stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as resp:  # loopback only
        data: dict[str, Any] = json.loads(resp.read())
        return data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded service in its own process, so its served counts outlive every killed client."""
    workdir = tmp_path_factory.mktemp("server")
    cmd = [
        sys.executable, "-m", "evomerge_sdk.cli", "serve-local", "--small", "--port", "0",
        "--pool-sizes", "5", "--latency", "0.05", "--output-dir", str(workdir),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "serve-local exited before announcing its URL"
        yield json.loads(line)["url"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _driver(url: str, folder: Path) -> list[str]:
    return [
        sys.executable, str(DRIVER), "--url", url, "--checkpoint", str(folder / "checkpoint.json"),
        "--cache", str(folder / "cache.sqlite"), "--out", str(folder / "result.json"),
    ]  # fmt: skip


def _generation(checkpoint: Path) -> int:
    """The generation a checkpoint records (-1 when there is none yet); it must always parse."""
    if not checkpoint.exists():
        return -1
    doc = json.loads(checkpoint.read_text(encoding="utf-8"))  # atomic writes: never half a file
    assert doc["format"] == "evomerge-sdk/search-checkpoint"
    return int(doc["state"]["generation"])


def test_sigkilled_search_resumes_to_the_same_result_paying_only_what_was_in_flight(
    server: str, tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()

    before = _stats(server)
    subprocess.run(_driver(server, whole), check=True, capture_output=True, timeout=120)
    after_whole = _stats(server)
    paid_whole = after_whole["served_requests"] - before["served_requests"]
    total_generations = json.loads((whole / "result.json").read_text())["result"]["history"][-1]["generation"]
    assert paid_whole == SEARCH.denoise.max_evaluations + SEARCH.scale.max_evaluations  # type: ignore[union-attr]

    rng = random.Random(20261123)
    checkpoint = killed / "checkpoint.json"
    kills = 0
    for _ in range(KILLS):
        start_gen = _generation(checkpoint)
        proc = subprocess.Popen(_driver(server, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Let it make progress (a new checkpoint), then kill it at a random moment of the next generations.
        deadline = time.monotonic() + 60
        while proc.poll() is None and _generation(checkpoint) <= start_gen and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        assert _generation(checkpoint) <= total_generations
    assert kills >= 2, "the search finished before it could be killed: make it slower"
    done = subprocess.run(_driver(server, killed), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    after_killed = _stats(server)

    want = json.loads((whole / "result.json").read_text())["result"]
    got = json.loads((killed / "result.json").read_text())["result"]
    assert got == want
    paid_killed = after_killed["served_requests"] - after_whole["served_requests"]
    # Each kill loses at most the evaluations in flight (the scheduler runs at most POPSIZE at once);
    # everything that finished earlier is answered from the checkpoint or the SQLite cache.
    assert paid_whole <= paid_killed <= paid_whole + kills * POPSIZE
    tokens_killed = after_killed["served_tokens"] - after_whole["served_tokens"]
    assert tokens_killed <= (paid_whole + kills * POPSIZE) * TOKENS_PER_EVALUATION
    # A run started on a finished checkpoint returns the result at once, paying nothing.
    again = subprocess.run(_driver(server, killed), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert _stats(server)["served_requests"] == after_killed["served_requests"]


# -- damaged and foreign checkpoints ----------------------------------------------------------------
assert SEARCH.denoise is not None
SHORT = attrs.evolve(SEARCH, denoise=attrs.evolve(SEARCH.denoise, max_evaluations=12), scale=None)
Mangle = Callable[[dict[str, Any]], bytes]


def _good_checkpoint(path: Path) -> dict[str, Any]:
    anyio.run(EvoMerge(SyntheticPool(5, seed=1), 5, SHORT, checkpoint=path).run)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


DAMAGE: dict[str, tuple[Mangle, str]] = {
    "empty file": (lambda doc: b"", "not readable JSON"),
    "truncated": (lambda doc: json.dumps(doc).encode()[:200], "not readable JSON"),
    "not UTF-8": (lambda doc: b"\xff\xfe\x00garbage", "not readable JSON"),
    "foreign JSON": (lambda doc: b'{"hello": "world"}', "not an evomerge-sdk search checkpoint"),
    "a JSON list": (lambda doc: b"[1, 2, 3]", "not an evomerge-sdk search checkpoint"),
    "future version": (lambda doc: json.dumps({**doc, "version": 99}).encode(), "unsupported version"),
    "other pool size": (lambda doc: json.dumps({**doc, "n_models": 7}).encode(), "for 7 models"),
    "other config": (
        lambda doc: json.dumps({**doc, "config": {**doc["config"], "seed": 12345}}).encode(),
        "different search config",
    ),
    "state missing": (
        lambda doc: json.dumps({k: v for k, v in doc.items() if k != "state"}).encode(),
        "damaged",
    ),
    "state mangled": (
        lambda doc: json.dumps({**doc, "state": {**doc["state"], "generation": "many"}}).encode(),
        "damaged",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_foreign_checkpoint_is_refused_clearly(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    doc = _good_checkpoint(path)
    mangle, needle = DAMAGE[damage]
    path.write_bytes(mangle(doc))
    with pytest.raises(ConfigError, match=needle) as refused:
        anyio.run(EvoMerge(SyntheticPool(5, seed=1), 5, SHORT, checkpoint=path).run)
    assert str(path) in str(refused.value)
    assert path.read_bytes() == mangle(doc)  # refused, never overwritten


def test_checkpoints_are_written_atomically_and_user_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    _good_checkpoint(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]  # no temp file left behind
    assert os.access(path, os.R_OK)
