"""Token accounting: exact tiktoken counts, the offline upper bound, lazy loading, no blocked loop."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk import ChatRequest, ConfigError, Message
from evomerge_sdk.scheduler import TokenCounter, default_encoding_for, load_encoding
from evomerge_sdk.scheduler import _tokens as tokens_module

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "tiktoken"


def _exact(name: str) -> object:
    """The real encoding, or skip: exact counts need the tiktoken files (CI sets TIKTOKEN_CACHE_DIR)."""
    enc = load_encoding(name, download_timeout=None)
    if enc is None:
        pytest.skip("tiktoken files unavailable: set TIKTOKEN_CACHE_DIR to a folder holding them")
    return enc


@pytest.mark.parametrize(
    "model, encoding",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("claude-3-5-haiku", "cl100k_base"),
        ("local-base", "cl100k_base"),
    ],
)
def test_model_families_map_to_encodings(model: str, encoding: str) -> None:
    assert default_encoding_for(model) == encoding
    assert TokenCounter().encoding_name(model) == encoding


def test_overrides_exact_then_longest_prefix() -> None:
    counter = TokenCounter(encodings={"claude-*": "bytes", "claude-x*": "o200k_base", "gpt-4": "o200k_base"})
    assert counter.encoding_name("claude-3-opus") == "bytes"
    assert counter.encoding_name("claude-x1") == "o200k_base"
    assert counter.encoding_name("gpt-4") == "o200k_base"
    assert counter.encoding_name("gpt-4-turbo") == "cl100k_base"
    everything = TokenCounter(encodings={"*": "bytes"})
    assert everything.encoding_name("gpt-4o") == "bytes"
    assert not everything.is_exact("gpt-4o")
    assert everything.count_text("héllo", "gpt-4o") == len("héllo".encode())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"encodings": {"": "cl100k_base"}}, "encodings keys"),
        ({"encodings": {"m": ""}}, "encoding names"),
        ({"download_timeout": -1}, "download_timeout"),
        ({"offload_chars": -5}, "offload_chars"),
    ],
)
def test_bad_counter_settings_fail_at_construction(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TokenCounter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("model, name", [("gpt-4", "cl100k_base"), ("gpt-4o", "o200k_base")])
def test_exact_counts_follow_openai_chat_framing(model: str, name: str) -> None:
    enc = _exact(name)
    messages = [Message("system", "You are terse."), Message("user", "Name the capital of France.")]
    expected = 3 + sum(3 + len(enc.encode(m.role)) + len(enc.encode(m.content)) for m in messages)  # type: ignore[attr-defined]
    counter = TokenCounter()
    assert counter.is_exact(model)
    assert counter.count_messages(messages, model) == expected
    assert counter.count_request(ChatRequest(model=model, messages=messages)) == expected


def test_text_that_looks_like_a_special_token_is_ordinary_text() -> None:
    _exact("cl100k_base")
    assert TokenCounter().count_text("<|endoftext|>", "gpt-4") > 1


def test_prompt_fields_in_extra_add_an_upper_bound() -> None:
    counter = TokenCounter(encodings={"*": "bytes"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    plain = ChatRequest(model="m", messages="hi")
    with_tools = ChatRequest(model="m", messages="hi", extra={"tools": tools, "seed": 1})
    extra = len(json.dumps(tools).encode())
    assert counter.count_request(with_tools) == counter.count_request(plain) + extra


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=400))
def test_byte_estimate_bounds_the_real_count(text: str) -> None:
    for name in ("cl100k_base", "o200k_base"):
        enc = _exact(name)
        assert len(enc.encode_ordinary(text)) <= len(text.encode("utf-8"))  # type: ignore[attr-defined]
    exact = TokenCounter().count_messages([Message("user", text)], "gpt-4o")
    estimate = TokenCounter(encodings={"*": "bytes"}).count_messages([Message("user", text)], "gpt-4o")
    assert exact <= estimate


@pytest.mark.anyio
async def test_big_prompts_are_counted_off_the_event_loop() -> None:
    counter = TokenCounter(offload_chars=10_000)
    await counter.aencoding("gpt-4o")  # a first load runs in a thread too
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        small = ChatRequest(model="gpt-4o", messages="short prompt")
        before = ticks
        n_small = await counter.acount_request(small)
        assert ticks == before  # small prompts: counted inline, no thread hop, no yield
        big = ChatRequest(model="gpt-4o", messages="merge the models. " * 20_000)
        n_big = await counter.acount_request(big)
        assert ticks > before  # the loop kept running while a worker thread counted
        done = True
    assert n_small == counter.count_request(small)
    assert n_big == counter.count_request(big)


_FALLBACK_SCRIPT = """
import json, structlog, sys
from evomerge_sdk.scheduler import TokenCounter
from evomerge_sdk import Message
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
counter = TokenCounter(download_timeout=float(sys.argv[1]) or None)
msgs = [Message("user", "Grüße, merge these models please.")]
counts = [counter.count_messages(msgs, "gpt-4o") for _ in range(3)]
counts.append(counter.count_messages(msgs, "gpt-4o-mini"))
print(json.dumps({"exact": counter.is_exact("gpt-4o"), "counts": counts}))
"""


def _run_offline(cache_dir: Path, download_timeout: float) -> tuple[dict[str, object], str]:
    env = dict(os.environ)
    env.pop("DATA_GYM_CACHE_DIR", None)
    env["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    # Any download attempt goes to a closed loopback port: offline, deterministically and at once.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env[var] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, str(download_timeout)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard only
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("download_timeout", [5.0, 0.0])
def test_offline_falls_back_to_an_upper_bound_with_one_warning(
    tmp_path: Path, download_timeout: float
) -> None:
    result, log = _run_offline(tmp_path, download_timeout)
    assert result["exact"] is False
    bound = 3 + 3 + len(b"user") + len("Grüße, merge these models please.".encode())
    assert result["counts"] == [bound] * 4
    assert log.count("tiktoken_unavailable") == 1  # once per encoding, not per count
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_a_corrupt_cache_file_is_not_trusted_nor_deleted(tmp_path: Path) -> None:
    url, _ = tokens_module._KNOWN_FILES["o200k_base"]
    bad = tmp_path / hashlib.sha1(url.encode()).hexdigest()
    bad.write_bytes(b"not a bpe file")
    result, log = _run_offline(tmp_path, 0.0)
    assert result["exact"] is False
    assert bad.read_bytes() == b"not a bpe file"
    assert "tiktoken_unavailable" in log


def test_real_files_in_the_cache_dir_are_used_offline(tmp_path: Path) -> None:
    if not (SHARED / "fb374d419588a4632f3f557e76b4b70aebbca790").exists():
        pytest.skip("no shared tiktoken folder beside the repository")
    result, log = _run_offline(SHARED, 5.0)
    assert result["exact"] is True
    assert "tiktoken_unavailable" not in log


@pytest.mark.anyio
async def test_download_checks_the_hash_and_writes_atomically(tmp_path: Path) -> None:
    payload = b"rank file contents"
    app = web.Application()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=payload)

    app.router.add_get("/f", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        good = hashlib.sha256(payload).hexdigest()
        target = tmp_path / "cache" / "entry"
        await anyio.to_thread.run_sync(
            tokens_module._download, f"http://127.0.0.1:{port}/f", good, str(target), 5.0
        )
        assert target.read_bytes() == payload
        with pytest.raises(OSError, match="sha256"):
            await anyio.to_thread.run_sync(
                tokens_module._download, f"http://127.0.0.1:{port}/f", "0" * 64, str(tmp_path / "other"), 5.0
            )
        assert not (tmp_path / "other").exists()
    finally:
        await runner.cleanup()


def test_importing_the_sdk_loads_no_encoding() -> None:
    code = "import sys, evomerge_sdk, evomerge_sdk.scheduler; print('tiktoken' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
