"""The SDK logs through the standard library (structlog's stdlib integration): `logging` configuration
controls everything it prints; an application that configures structlog gets the events instead."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from evomerge_sdk._logs import get_logger
from evomerge_sdk.local.repository import RepositoryConfig, build_repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.service import MergeServiceClient


def test_events_go_through_logging_which_controls_them(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, restore_logging: None
) -> None:
    structlog.reset_defaults()
    log = get_logger("evomerge_sdk.test")
    with caplog.at_level(logging.WARNING, logger="evomerge_sdk"):
        log.debug("a_detail", n=1)
        log.info("a_routine_event")
        log.warning("worth_knowing", why="shown")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("evomerge_sdk.test", "WARNING", "event='worth_knowing' why='shown'")
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="evomerge_sdk"):
        log.debug("a_detail", n=1)
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    caplog.clear()
    with caplog.at_level(logging.CRITICAL, logger="evomerge_sdk"):  # the application silences the SDK
        log.warning("worth_knowing")
        log.error("a_failure")
    assert caplog.records == []
    assert capsys.readouterr().out == ""  # never stdout
    with structlog.testing.capture_logs() as seen:  # an application that configures structlog
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
