"""The SDK stays quiet below WARNING until the application configures structlog."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from evomerge_sdk._logs import get_logger
from evomerge_sdk.local.repository import RepositoryConfig, build_repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.service import MergeServiceClient


def test_routine_events_wait_for_the_application(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    structlog.reset_defaults()
    log = get_logger("evomerge_sdk.test")
    log.debug("a_detail", n=1)
    log.info("a_routine_event")
    assert capsys.readouterr().out == ""
    log.warning("worth_knowing", why="always emitted")
    assert "worth_knowing" in capsys.readouterr().out
    with structlog.testing.capture_logs() as seen:
        log.debug("a_detail", n=1)
        log.info("a_routine_event")
    assert [(e["event"], e["log_level"]) for e in seen] == [
        ("a_detail", "debug"),
        ("a_routine_event", "info"),
    ]


@pytest.mark.anyio
async def test_the_embedded_service_prints_nothing_into_an_unconfigured_application(
    capsys: pytest.CaptureFixture[str], restore_logging: None, tmp_path: Path
) -> None:
    repository = build_repository(RepositoryConfig.small(), cache_dir=tmp_path)
    structlog.reset_defaults()
    async with (
        LocalService(repository, pool_sizes=(5,), output_dir=tmp_path) as service,
        MergeServiceClient(service.url) as client,
    ):
        preset = (await client.presets())[0]
        await client.create_session(preset.preset_id)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
