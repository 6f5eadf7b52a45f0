"""`evomerge serve` from the command line: the base URL a merged model records, a pool whose models sit
behind different providers (`--providers FILE`), `--version`, and a providers file that is wrong."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import aiohttp
import anyio
import pytest

from evomerge_sdk import MergedSpec
from evomerge_sdk.cli import main
from evomerge_sdk.cli._serve import load_providers_file
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local import LocalService
from evomerge_sdk.local.repository import Repository


def _spec(repo: Repository, base_url: str) -> MergedSpec:
    target = repo.targets()[0]
    return MergedSpec(
        mode="output",
        pool=repo.pool(target, 4, 0),
        alpha=(1.0, 0.0, 0.7, 1.0),
        beta=(0.5, 0.4, -0.3, 0.2),
        reference="base",
        answer_set=tuple(repo.tokenizer.tokens[int(i)] for i in target.test.answer_ids),
        source={"kind": "openai", "base_url": base_url},
        name="merged-cli",
    )


async def _serve_and_ask(path: Path, prompt: str, *flags: str, env: dict[str, str]) -> dict[str, object]:
    cmd = [sys.executable, "-m", "evomerge_sdk.cli", "serve", str(path), "--port", "0", *flags]
    async with await anyio.open_process(cmd, env=env) as proc:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive(1)
            assert chunk, "evomerge serve exited before it listened"
            line += chunk
        url = json.loads(line)["base_url"] + "/chat/completions"
        body = {"model": "merged-cli", "messages": [{"role": "user", "content": prompt}]}
        try:
            async with aiohttp.ClientSession() as http, http.post(url, json=body) as reply:
                assert reply.status == 200, await reply.text()
                answer: dict[str, object] = await reply.json()
        finally:
            proc.terminate()
            await proc.wait()
    return answer


@pytest.mark.anyio
async def test_serve_uses_the_recorded_url_and_a_providers_file(repo: Repository, tmp_path: Path) -> None:
    prompt = repo.targets()[0].test.prompts[0]
    async with LocalService(repo, pool_sizes=(4,)) as service:
        spec = _spec(repo, f"{service.url}/v1")
        path = tmp_path / "merged.json"
        path.write_text(json.dumps(spec.to_dict()), encoding="utf-8")
        recorded = await _serve_and_ask(path, prompt, env=dict(os.environ))  # no --base-url
        # The same pool, each model through a provider of its own (here all OpenAI-compatible).
        providers = {
            m: {"provider": "openai", "base_url": f"{service.url}/v1", "api_key_env": "POOL_KEY"}
            for m in spec.queried_models()
        }
        file = tmp_path / "providers.json"
        file.write_text(json.dumps(providers), encoding="utf-8")
        mixed = await _serve_and_ask(
            path, prompt, "--providers", str(file), env={**os.environ, "POOL_KEY": "sk-pool"}
        )
    assert recorded["choices"] == mixed["choices"]  # type: ignore[comparison-overlap]


def test_a_wrong_providers_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "providers.json"
    file.write_text(json.dumps({"m": {"provider": "openai", "api_key_env": "NOT_SET_ANYWHERE"}}))
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        load_providers_file(file)
    file.write_text(json.dumps({"m": {"provider": "openai", "key": "sk-in-the-file"}}))
    with pytest.raises(ConfigError, match="unknown fields"):
        load_providers_file(file)
    file.write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_providers_file(file)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("evomerge 0.")
