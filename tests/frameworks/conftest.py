"""A real `evomerge serve` (a subprocess, 127.0.0.1, port 0) for the agent-framework tests, in both modes.

The frameworks are used through their own packages, as a user would. Some of them reach out on their own
(LiteLLM fetches a model price map on import, LangChain can trace to LangSmith): their switches are set
here before any of them is imported, and an audit hook refuses, for the whole test run, any connection
to an address other than loopback, so a framework that phones home fails its test instead of leaving the
machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before any framework is imported (LiteLLM reads this at import time).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_TELEMETRY"] = "False"
os.environ["LANGSMITH_TRACING"] = "false"
os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"

from framework_kit import API_KEY, Served

from evomerge_sdk.local import preset_id
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.merged import MergedSpec, save_spec


def _loopback_only(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: a `socket.connect` to anything but loopback (or a Unix socket) is refused."""
    if event != "socket.connect":
        return
    address = args[1]
    if not isinstance(address, tuple):  # AF_UNIX
        return
    host = str(address[0])
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConnectionRefusedError(f"the framework tests may only contact loopback, not {host!r}")


sys.addaudithook(_loopback_only)


def _source() -> dict[str, Any]:
    return {
        "kind": "embedded",
        "repository_seed": 0,
        "small_repository": True,
        "pool_seed": 0,
        "pool_size": 4,
    }


def _serve(path: Path, api_key: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start `evomerge serve PATH --port 0`; its stderr goes to a file beside PATH (read if it fails)."""
    env = {**os.environ, "EVOMERGE_API_KEY": api_key}
    cmd = [sys.executable, "-m", "evomerge_sdk.cli", "serve", str(path), "--port", "0"]
    with open(path.with_suffix(".stderr"), "w", encoding="utf-8") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        proc.stdout.close()
        raise AssertionError(f"evomerge serve did not start: {path.with_suffix('.stderr').read_text()}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def output_server(repo: Repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`evomerge serve` over an output-space merge of the small repository's 4-adapter pool."""
    target = repo.targets()[0]
    tokens = repo.tokenizer.tokens
    spec = MergedSpec(
        mode="output",
        pool=repo.pool(target, 4, 0),
        alpha=(1.0, 0.0, 0.7, 1.0),
        beta=(0.5, 0.4, -0.3, 0.2),
        reference="base",
        answer_set=tuple(tokens[int(i)] for i in target.test.answer_ids),
        source=_source(),
        name="merged-output",
    )
    path = save_spec(spec, tmp_path_factory.mktemp("serve-output") / "merged.json")
    proc, info = _serve(path, API_KEY)
    try:
        yield Served(info["base_url"], info["model"], spec, target.test.prompts[0])
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def parameter_server(repo: Repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`evomerge serve` over a parameter-mode merge (the embedded merge service answers)."""
    target = repo.targets()[0]
    spec = MergedSpec(
        mode="provider",
        pool=repo.pool(target, 4, 0),
        alpha=(1.0, 0.5, 0.0, 1.0),
        beta=(0.5, 0.5, 0.2, -0.1),
        preset_id=preset_id(target.name, 4),
        source=_source(),
        name="merged-parameter",
    )
    path = save_spec(spec, tmp_path_factory.mktemp("serve-parameter") / "merged.json")
    proc, info = _serve(path, API_KEY)
    try:
        yield Served(info["base_url"], info["model"], spec, target.test.prompts[0])
    finally:
        _stop(proc)
