"""The command line both case-study benchmarks share: every (seed, OOD target) of one pool size, run
in worker processes, then the script's tables and its one-line JSON summary."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Measure this checkout's package, whichever copy of it is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from evomerge_sdk.local.repository import RepositoryConfig, build_repository

Case = dict[str, Any]


def run_cases(
    doc: str,
    title: str,
    run_job: Callable[[tuple[int, str, int]], Case],
    report: Callable[[list[Case]], dict[str, Any]],
) -> None:
    """Parse --quick/--seeds/--pool/--jobs, run `run_job` on every case, print `report` and its JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, two OOD targets (< 60 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-9")
    parser.add_argument("--pool", type=int, default=20, help="adapters per pool (default 20)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else list(range(10)))
    started = time.perf_counter()
    repos = {s: build_repository(RepositoryConfig(seed=s)) for s in seeds}  # fill the build cache once
    targets = [t.name for t in repos[seeds[0]].targets() if t.kind == "ood"]
    if args.quick:
        targets = targets[:2]
    jobs = [(s, t, args.pool) for s in seeds for t in targets]
    with multiprocessing.Pool(args.jobs) as workers:
        cases = workers.map(run_job, jobs)
    print(
        f"# {title}: pool {args.pool}, seeds {seeds}, targets {targets}; "
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(json.dumps(report(cases), separators=(",", ":")))
