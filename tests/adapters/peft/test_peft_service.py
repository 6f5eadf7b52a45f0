"""The PEFT backend behind the SDK's merge service, over real HTTP on 127.0.0.1: the SDK's client and
search drive it unchanged; concurrent evaluations get their serial losses; merges reload with plain PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from evomerge_peft import Base, Example, Scorer, World, tokenise
from evomerge_peft._backend import PeftBackend
from peft import PeftModel
from transformers import AutoModelForCausalLM

from evomerge_sdk import DEFAULT, EvoMerge, MergeServiceClient, Scheduler, ServiceObjective
from evomerge_sdk.engine import fit_to_queries
from evomerge_sdk.local import LocalService

pytestmark = pytest.mark.anyio


def _datasets(world: World) -> dict[str, Path]:
    target = world.targets[0]
    return {f"{target}:{split}": world.data(target, split) for split in ("validation", "held_out")}


@pytest.fixture(scope="module")
def backend(world: World, base: Base) -> PeftBackend:
    return PeftBackend(base, {"ood": world.pool(world.targets[0])}, _datasets(world))


@pytest.fixture
async def service(backend: PeftBackend, tmp_path: Path) -> AsyncIterator[LocalService]:
    async with LocalService(backend=backend, output_dir=tmp_path, workers=4) as s:
        yield s


async def test_health_presets_and_sessions(service: LocalService, world: World) -> None:
    async with MergeServiceClient(service.url) as client:
        health = await client.health()
        assert health["status"] == "ok" and health["concurrent_evaluation"] == "safe"
        (preset,) = await client.presets()
        assert preset.preset_id == "ood" and preset.adapter_count == len(world.pool(world.targets[0]))
        assert set(preset.datasets) == set(_datasets(world))
        session = await client.create_session("ood", query_plus={"dataset": f"{world.targets[0]}:validation"})
        assert session.n_examples == world.config.validation and session.minibatch


async def test_sixty_four_concurrent_evaluations_get_the_serial_losses(
    service: LocalService, world: World
) -> None:
    rng = np.random.default_rng(0)
    async with (
        Scheduler(max_concurrency=64) as scheduler,
        MergeServiceClient(service.url, scheduler=scheduler) as client,
    ):
        session = await client.create_session("ood", query_plus={"dataset": f"{world.targets[0]}:validation"})
        n = session.adapter_count
        vectors = [(rng.uniform(0.2, 1, n), rng.uniform(-0.5, 0.8, n)) for _ in range(64)]
        serial = [(await client.evaluate(session, a, b, cache=False)).loss for a, b in vectors]
        concurrent: list[float] = [0.0] * 64

        async def one(k: int) -> None:
            a, b = vectors[k]
            concurrent[k] = (await client.evaluate(session, a, b, cache=False)).loss

        async with anyio.create_task_group() as tg:
            for k in range(64):
                tg.start_soon(one, k)
        assert concurrent == serial
        assert len(set(serial)) == 64


async def test_inline_prompt_completion_and_messages_score_like_the_file(
    service: LocalService, world: World
) -> None:
    target = world.targets[0]
    rows = [json.loads(line) for line in world.data(target, "validation").read_text().splitlines()][:8]
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    async with MergeServiceClient(service.url) as client:
        named = await client.create_session("ood", query_plus={"dataset": f"{target}:validation"})
        inline = await client.create_session("ood", query_plus={"examples": rows})
        chat = await client.create_session("ood", query_plus={"examples": chats})
        n = named.adapter_count
        a, b = np.full(n, 0.8), np.full(n, 1 / n)
        want = await client.evaluate(named, a, b, examples=list(range(8)))
        for session in (inline, chat):
            got = await client.evaluate(session, a, b)
            assert abs(got.loss - want.loss) < 1e-6
            assert got.usage.input_tokens == want.usage.input_tokens > 0


async def test_bad_sessions_are_4xx_naming_the_problem(service: LocalService) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for query_plus, message in (
            ({"dataset": "nope"}, "unknown dataset"),
            ({"examples": [{"prompt": "x"}]}, "prompt and completion"),
            ({"examples": [{"messages": [{"role": "user", "content": "hi"}]}]}, "at least two"),
            ({"examples": [{"messages": [{"role": "user", "content": "a"}] * 2}]}, "end with the assistant"),
        ):
            async with http.post(
                f"{service.url}/v1/sessions", json={"preset_id": "ood", "query_plus": query_plus}
            ) as r:
                assert r.status == 422, await r.text()
                assert message in (await r.json())["error"]["message"]


async def test_chat_serves_base_adapters_and_materialised_merges(service: LocalService, world: World) -> None:
    import aiohttp

    target = world.targets[0]
    prompt = json.loads(world.data(target, "validation").read_text().splitlines()[0])["prompt"]
    async with MergeServiceClient(service.url) as client, aiohttp.ClientSession() as http:
        session = await client.create_session("ood", query_plus={"dataset": f"{target}:validation"})
        n = session.adapter_count
        merged = await client.materialize(session, np.full(n, 0.9), np.full(n, 1 / n))
        assert merged.adapter_name is not None and (Path(merged.path) / "adapter_model.safetensors").exists()
        answers = {}
        for model in ("base", next(iter(world.pool(target))), merged.adapter_name):
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "logprobs": True,
                    "top_logprobs": 3, "max_tokens": 1}  # fmt: skip
            async with http.post(f"{service.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                data = await r.json()
            content = data["choices"][0]["logprobs"]["content"][0]
            assert len(content["top_logprobs"]) == 3 and content["logprob"] <= 0
            assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] == 1
            answers[model] = content["top_logprobs"]
        assert answers["base"] != answers[merged.adapter_name]
        completion = await client.complete(
            session, np.full(n, 0.9), np.full(n, 1 / n), prompt, top_logprobs=2
        )
        assert completion.text.strip() and completion.logprobs
        unknown = {"model": "no-such", "messages": [{"role": "user", "content": "x"}]}
        async with http.post(f"{service.url}/v1/chat/completions", json=unknown) as r:
            assert r.status == 404


async def test_evomerge_serve_serves_a_peft_merge(service: LocalService, world: World) -> None:
    # `evomerge serve merged.json --base-url <evomerge-peft serve>` runs exactly this server and model.
    import aiohttp

    from evomerge_sdk.merged import MergedModelServer, MergedSpec, open_merged

    target = world.targets[0]
    prompt = json.loads(world.data(target, "validation").read_text().splitlines()[0])["prompt"]
    pool = tuple(world.pool(target))
    n = len(pool)
    spec = MergedSpec(mode="provider", pool=pool, alpha=[0.9] * n, beta=[1 / n] * n, preset_id="ood",
                      source={"kind": "service", "base_url": service.url})  # fmt: skip
    async with (
        MergeServiceClient(service.url) as client,
        open_merged(spec, base_url=service.url) as merged,
        MergedModelServer(merged, port=0) as server,
        aiohttp.ClientSession() as http,
    ):
        session = await client.create_session("ood")
        want = await client.complete(session, spec.alpha, spec.beta, prompt)
        chat = [{"role": "user", "content": prompt}]
        body = {"model": server.model_name, "messages": chat, "max_tokens": 1}
        async with http.post(f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == want.text


@pytest.fixture
def served(world: World, tmp_path: Path) -> Iterator[str]:
    """`evomerge-peft serve` as users run it: a real process on 127.0.0.1, a free port."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for name, folder in world.pool(world.targets[0]).items():
        (pool / name).symlink_to(folder)
    data = [f"--data={name}={path}" for name, path in _datasets(world).items()]
    command = [sys.executable, "-c", "from evomerge_peft.cli import main; raise SystemExit(main())", "serve",
               "--base", str(world.base), "--pool", f"ood={pool}", *data, "--port", "0",
               "--output-dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield json.loads(line)["url"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_search_over_http_beats_the_best_single_adapter_and_reloads_with_peft(
    served: str, world: World, base: Base
) -> None:
    target = world.targets[0]
    async with (
        Scheduler(max_concurrency=8) as scheduler,
        MergeServiceClient(served, scheduler=scheduler) as client,
    ):
        validation = await client.create_session("ood", query_plus={"dataset": f"{target}:validation"})
        held_out = await client.create_session("ood", query_plus={"dataset": f"{target}:held_out"})
        n = validation.adapter_count
        singles = []
        for i in range(n):
            one_hot = np.eye(n)[i]
            singles.append((await client.evaluate(validation, np.ones(n), one_hot)).loss)
        best = np.eye(n)[int(np.argmin(singles))]
        best_held_out = (await client.evaluate(held_out, np.ones(n), best)).loss
        config = fit_to_queries(DEFAULT, n, validation.n_examples or 0, 150 * (validation.n_examples or 0))
        result = await EvoMerge(ServiceObjective(client, validation, held_out), n, config).run()
        merged_held_out = (await client.evaluate(held_out, result.alpha, result.beta)).loss
        assert merged_held_out < best_held_out
        folder = Path((await client.materialize(validation, result.alpha, result.beta)).path)
    lines = world.data(target, "held_out").read_text().splitlines()
    data = tokenise(base.tokenizer, [Example(**json.loads(line)) for line in lines])
    model = AutoModelForCausalLM.from_pretrained(world.base, local_files_only=True)
    reloaded, _ = Scorer.of(base).loss(PeftModel.from_pretrained(model, folder).eval(), data)
    assert abs(reloaded - merged_held_out) < 1e-4
