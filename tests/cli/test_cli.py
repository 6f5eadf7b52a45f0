"""The `evomerge` command line: serve-local as a real process, argument and setup errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from evomerge_sdk import cli
from evomerge_sdk.cli import _demo as cli_demo
from evomerge_sdk.service import MergeServiceClient

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_serve_local_runs_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "EVOMERGE_CACHE_DIR": str(tmp_path), "EVOMERGE_API_KEY": "sk-cli-secret-42"}
    command = [sys.executable, "-m", "evomerge_sdk.cli", "serve-local", "--small", "--port", "0"]
    command += ["--pool-sizes", "5", "--rpm", "6000", "--output-dir", str(tmp_path / "merged")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and info["auth"] is True

        async def use() -> tuple[int, float]:
            async with MergeServiceClient(info["url"], api_key="sk-cli-secret-42") as client:
                presets = await client.presets()
                session = await client.create_session("ood:ner/news/pool-5")
                ev = await client.evaluate(session, [1.0] * 5, [0.2] * 5)
                return len(presets), ev.loss

        count, loss = anyio.run(use)
        assert count == 5 and loss > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert "sk-cli-secret-42" not in proc.stderr.read()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--pool-size", "0"])
    assert exit_info.value.code == 2
    assert "--pool-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])
    assert cli.main(["serve-local", "--host", "0.0.0.0"]) == 2
    assert "needs an api_key" in capsys.readouterr().err


def test_help_lists_the_commands_and_demo_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "serve-local" in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--quick", "--seed", "--pool-size", "--target", "--budget", "--out"):
        assert flag in out


def test_demo_without_the_cli_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "rich" else real(name))
    assert cli.main(["demo", "--quick"]) == 2
    assert "pip install 'evomerge-sdk[cli]'" in capsys.readouterr().err


def test_live_progress_shows_generation_best_loss_and_spend() -> None:
    import io

    import numpy as np
    from rich.console import Console

    from evomerge_sdk.engine import Progress

    buffer = io.StringIO()
    reporter = cli_demo._RichReporter(Console(file=buffer, force_terminal=True, width=140))
    progress = Progress("scale", 7, 2, 140, 40, 1.2345, 1.3, 1.25, None, np.zeros(3), 0.1)
    reporter.phase("Evo-Merging: two-stage search")
    reporter.search("Evo-Merging", progress, 504_000, 8_000_000)
    reporter.close()
    shown = buffer.getvalue()
    for text in ("Evo-Merging: scale, gen 7, best loss 1.2345", "504,000 / 8,000,000 tokens", "two-stage"):
        assert text in shown


def test_the_table_title_names_a_preset_other_than_the_default() -> None:
    from evomerge_sdk.cli._demo import _title
    from evomerge_sdk.demo import DemoConfig

    assert _title("ood:ner/news", 20, DemoConfig()) == "ood:ner/news, pool of 20, seed 0"
    title = _title("ood:ner/news", 20, DemoConfig(preset="default/no_denoising", quick=True, seed=3))
    assert title == "ood:ner/news, pool of 20, seed 3, Evo-Merging row: preset default/no_denoising (quick)"
