"""One replica of the embedded merge service in its own process, for the replica tests.

    python tests/_replica_driver.py [--latency SECONDS]

Builds the small embedded repository (in memory, from its seed: every replica builds the same one), serves
its pools of 5 on 127.0.0.1 and a free port, prints one JSON line {"url": ...} once it listens, and runs
until it is killed (the replica tests SIGKILL one in the middle of a search).
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio

from evomerge_sdk.local import FaultConfig, LocalService
from evomerge_sdk.local.repository import RepositoryConfig, build_repository


async def main(latency: float) -> None:
    """Serve until killed."""
    repo = build_repository(RepositoryConfig.small(), use_cache=False)
    async with LocalService(repo, pool_sizes=(5,), faults=FaultConfig(latency=latency)) as service:
        print(json.dumps({"url": service.url}), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    try:
        anyio.run(main, args.latency)
    except KeyboardInterrupt:
        sys.exit(0)
