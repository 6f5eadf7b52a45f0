"""Disk: killed writes leave no lasting debris, materialize is capped per session, a full disk is named.

- temp files that killed writes left (`.<name>.<random>.tmp`) are removed when the embedded service starts
  over its output folder, and by the next write of the same file once they are stale;
- each session may materialize at most `max_materialized_files` merges and `max_materialized_bytes`:
  past either, materialize is refused (409 JSON, nothing written);
- a disk that cannot take a file is a `StorageError` naming the path (a 507 from the service), and no
  temp file stays behind. The full disk is real: a child process whose file-size limit (RLIMIT_FSIZE)
  makes every write past 64 KiB fail, as a full or over-quota disk does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from evomerge_sdk import StorageError
from evomerge_sdk._io import STALE_SECONDS, write_json_atomic
from evomerge_sdk.local import LocalService
from evomerge_sdk.local.repository import Repository

pytestmark = pytest.mark.anyio


async def materialize(service: LocalService, count: int) -> list[tuple[int, dict[str, object]]]:
    """`count` distinct materialize calls in one session: (status, answer) of each."""
    out = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/v1/presets") as r:
            preset = (await r.json())["items"][0]
        n = preset["adapter_count"]
        async with http.post(f"{service.url}/v1/sessions", json={"preset_id": preset["preset_id"]}) as r:
            sid = (await r.json())["session_id"]
        for i in range(count):
            alpha = [0.5] * n
            beta = [0.1 * (i + 1)] * n
            url = f"{service.url}/v1/sessions/{sid}/materialize"
            async with http.post(url, json={"alpha": alpha, "beta": beta}) as r:
                assert r.content_type == "application/json"
                out.append((r.status, await r.json()))
    return out


async def test_debris_of_killed_writes_is_removed_when_the_service_starts(
    repo: Repository, tmp_path: Path
) -> None:
    debris = tmp_path / ".merged-0123456789abcdef.npz.k3j2x9.tmp"  # what mkstemp left when the write died
    debris.write_bytes(b"half a file")
    kept = tmp_path / "notes.txt"
    kept.write_text("not ours")
    async with LocalService(repo, pool_sizes=(4,), output_dir=tmp_path):
        assert not debris.exists()
    assert kept.exists()


def test_the_next_write_of_a_file_removes_its_stale_temps(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    stale = tmp_path / ".run.json.abc123.tmp"
    fresh = tmp_path / ".run.json.def456.tmp"  # may belong to a writer still running: kept
    for tmp in (stale, fresh):
        tmp.write_text("{")
    old = time.time() - STALE_SECONDS - 5
    os.utime(stale, (old, old))
    write_json_atomic(target, {"ok": True})
    assert not stale.exists() and fresh.exists()
    assert json.loads(target.read_text()) == {"ok": True}


@pytest.mark.parametrize("cap", ["files", "bytes"])
async def test_materialize_is_capped_per_session(repo: Repository, tmp_path: Path, cap: str) -> None:
    async with LocalService(repo, pool_sizes=(4,), output_dir=tmp_path) as probe:
        size = int((await materialize(probe, 1))[0][1]["bytes"])  # type: ignore[call-overload]
    for f in list(os.scandir(tmp_path)):
        os.unlink(f.path)
    limits = {"max_materialized_files": 2} if cap == "files" else {"max_materialized_bytes": 2 * size + 1}
    async with LocalService(repo, pool_sizes=(4,), output_dir=tmp_path, **limits) as service:
        answers = await materialize(service, 4)
    assert [status for status, _ in answers] == [200, 200, 409, 409]
    refusal = answers[2][1]["error"]
    assert "cap" in refusal["message"] and refusal["type"] == "materialize_limit"  # type: ignore[index]
    names = os.listdir(tmp_path)
    assert sum(n.startswith("merged-") for n in names) == 2
    assert not [n for n in names if n.endswith(".tmp")]


_FULL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
"""


def run_on_a_full_disk(code: str) -> dict[str, object]:
    """Run `code` in a child whose writes fail past 1 KiB; it prints one JSON line."""
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_full_disk_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.json"
    out = run_on_a_full_disk(
        f"""
        from pathlib import Path
        from evomerge_sdk import StorageError
        from evomerge_sdk._io import write_json_atomic
        try:
            write_json_atomic(Path({str(target)!r}), {{"x": "y" * 200_000}})
            print(json.dumps({{"error": None}}))
        except StorageError as exc:
            print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
        """
    )
    assert out["error"] == StorageError.__name__
    assert str(target) in str(out["message"])
    assert list(tmp_path.iterdir()) == []  # no temp file, no half file


def test_serve_local_answers_507_naming_the_path_when_the_disk_is_full(tmp_path: Path) -> None:
    out = run_on_a_full_disk(
        f"""
        import anyio, aiohttp
        from evomerge_sdk.local import LocalService
        from evomerge_sdk.local.repository import RepositoryConfig, build_repository

        async def main():
            repo = build_repository(RepositoryConfig.small(), use_cache=False)
            async with LocalService(repo, pool_sizes=(4,), output_dir={str(tmp_path)!r}) as s:
                async with aiohttp.ClientSession() as http:
                    async with http.get(s.url + "/v1/presets") as r:
                        preset = (await r.json())["items"][0]
                    n = preset["adapter_count"]
                    new = {{"preset_id": preset["preset_id"]}}
                    async with http.post(s.url + "/v1/sessions", json=new) as r:
                        sid = (await r.json())["session_id"]
                    body = {{"alpha": [0.5] * n, "beta": [0.3] * n}}
                    async with http.post(f"{{s.url}}/v1/sessions/{{sid}}/materialize", json=body) as r:
                        print(json.dumps({{"status": r.status, "answer": await r.json()}}))

        anyio.run(main)
        """
    )
    assert out["status"] == 507
    assert str(tmp_path) in out["answer"]["error"]["message"]  # type: ignore[index]
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.npz"))
