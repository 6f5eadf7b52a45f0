"""Validate the embedded repository (`evomerge_sdk.local`): what does each merge method reach on it?

For targets of the embedded repository, pools of 20 and 100 adapters and several seeds, this scores on
the targets' *test* prompts (never seen by any selection): the best single adapter of the pool (chosen on
validation loss), the uniform merge, the white-box Task Arithmetic / TIES / DARE (hyper-parameters tuned
on validation loss), a LoRAHub-style search, the paper's Evo-Merging protocol, the SDK's default search,
in full mode also the paper protocol's three ablations and the default search's denoising and
negative-beta ablations, and, for reference, the target's own specialist adapter (in the pool for
in-domain targets, never for out-of-domain ones).
Every search runs the engine (`evomerge_sdk.engine`) on `evomerge_sdk.testing.objective.LocalObjective`:
the repository's validation loss, minibatches where the preset asks for them, the held-out split for
early stopping.

It also measures the repository itself: an uncached build of the default 110-adapter repository, and
one evaluation (merge of the three LoRA pairs + forward pass and metrics on 300 validation prompts) at
pool sizes 20 and 100.

    python benchmarks/local.py --quick          # one OOD target, pools 20 and 100, one seed (< 60 s)
    python benchmarks/local.py                  # every target, pools 20 and 100, seeds 0 1 2

A seed picks the repository (its world and weights), the pools and the searches' seeds. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import numpy as np

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    PAPER,
    EvoMerge,
    SearchConfig,
    ablations,
    best_single,
    preset,
    uniform_merge,
)
from evomerge_sdk.local import whitebox
from evomerge_sdk.local.repository import Repository, RepositoryConfig, Target, build_repository
from evomerge_sdk.testing import LocalObjective

METHODS = (
    "specialist",
    "best_single",
    "uniform",
    "task_arithmetic",
    "ties",
    "dare",
    "lorahub",
    "evo_paper",
    "paper/no_denoising",
    "paper/no_scaling",
    "paper/no_negative_betas",
    "evo_default",
    "two-stage",
    "default/no_negative_betas",
)


def measure_build(seed: int) -> float:
    """Seconds for an uncached build of the default repository."""
    start = time.perf_counter()
    build_repository(RepositoryConfig(seed=seed), use_cache=False)
    return time.perf_counter() - start


def measure_evaluation(repository: Repository, sizes: Sequence[int], repeats: int = 200) -> dict[str, float]:
    """Median milliseconds of one merge + evaluation on 300 validation prompts, per pool size."""
    target = repository.targets()[0]
    out = {}
    for size in sizes:
        merger = repository.merger(repository.pool(target, size, 0))
        rng = np.random.default_rng(0)
        times = []
        for _ in range(repeats):
            alpha, beta = rng.random(size), rng.normal(0.0, 0.1, size)
            start = time.perf_counter()
            repository.evaluate(merger.merge(alpha, beta), target.validation)
            times.append(time.perf_counter() - start)
        out[str(size)] = 1e3 * statistics.median(times)
    return out


def role_means(
    repository: Repository, target: Target, pool: Sequence[str], values: np.ndarray
) -> dict[str, float]:
    """Mean of `values` (one per pool adapter) by the adapter's role towards the target."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, v in zip(pool, values, strict=True):
        groups[repository.role(name, target)].append(float(v))
    return {role: round(float(np.mean(v)), 3) for role, v in sorted(groups.items())}


async def run_case(
    repository: Repository, target: Target, size: int, seed: int, quick: bool
) -> dict[str, Any]:
    """Every method on one (target, pool size, seed); test accuracy and macro-F1 per method."""
    pool = repository.pool(target, size, seed)
    objective = LocalObjective(repository, pool, target)
    merger = objective.merger
    n = len(pool)
    out: dict[str, Any] = {
        "target": target.name,
        "kind": target.kind,
        "pool": size,
        "seed": seed,
        "methods": {},
    }

    def record(method: str, weights: Any, evaluations: int = 0, extra: dict[str, Any] | None = None) -> None:
        test = repository.evaluate(weights, target.test)
        row = {"accuracy": test.accuracy, "macro_f1": test.macro_f1, "test_loss": test.loss}
        row["evaluations"] = evaluations
        if extra:
            row.update(extra)
        out["methods"][method] = row

    record("specialist", repository.single(target.specialist))
    for name, baseline in (("best_single", best_single), ("uniform", uniform_merge)):
        result = await baseline(objective, n)
        record(name, merger.merge(result.alpha, result.beta), result.evaluations)
    vectors = whitebox.TaskVectors(repository, pool)
    for method in ("task_arithmetic", "ties", "dare"):
        tuned = whitebox.tune(vectors, method, target.validation, seed=seed)
        record(method, tuned.weights, len(whitebox.default_grid(method, n)), {"params": tuned.params})
    searches: dict[str, SearchConfig] = {"lorahub": LORAHUB, "evo_paper": PAPER}
    searches["evo_default"] = DEFAULT
    if not quick:
        searches |= {f"paper/{k}": v for k, v in ablations(PAPER).items()}
        # The default has no stage 1; "two-stage" puts the paper's in front, at the same budget.
        searches |= {name: preset(name) for name in ("two-stage", "default/no_negative_betas")}
    for name, config in searches.items():
        result = await EvoMerge(objective, n, attrs.evolve(config, seed=seed)).run()
        extra: dict[str, Any] = {}
        if name in ("evo_paper", "evo_default"):
            extra["alpha_by_role"] = role_means(repository, target, pool, result.alpha)
            extra["beta_by_role"] = role_means(repository, target, pool, result.beta)
        record(
            name,
            merger.merge(result.alpha, result.beta),
            result.evaluations + result.held_out_evaluations,
            extra,
        )
    return out


def summarise(cases: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean test accuracy / macro-F1 per (kind, pool size) and method."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for case in cases:
        for method, row in case["methods"].items():
            groups[f"{case['kind']}/{case['pool']}"][method].append((row["accuracy"], row["macro_f1"]))
    return {
        group: {
            m: {
                "accuracy": round(100 * float(np.mean([a for a, _ in v])), 1),
                "macro_f1": round(100 * float(np.mean([f for _, f in v])), 1),
                "accuracy_sd": round(100 * float(np.std([a for a, _ in v])), 1),
                "n": len(v),
            }
            for m, v in methods.items()
        }
        for group, methods in sorted(groups.items())
    }


def markdown(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table: methods as rows, (kind, pool size) groups as columns, test accuracy (macro-F1)."""
    groups = list(summary)
    lines = ["| method | " + " | ".join(f"{g} acc (F1)" for g in groups) + " |"]
    lines.append("| --- |" + " --- |" * len(groups))
    for method in METHODS:
        cells = []
        for g in groups:
            row = summary[g].get(method)
            cells.append("-" if row is None else f"{row['accuracy']:.1f} ({row['macro_f1']:.1f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "local",
        "mode": "quick" if args.quick else "full",
        "machine": f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}",
    }
    report["build_seconds_uncached"] = round(measure_build(args.seeds[0]), 2)
    print(f"uncached build of the default repository: {report['build_seconds_uncached']} s", flush=True)
    cases = []
    for seed in args.seeds:
        start = time.perf_counter()
        repository = build_repository(RepositoryConfig(seed=seed))
        print(f"seed {seed}: repository ready in {time.perf_counter() - start:.2f} s", flush=True)
        if seed == args.seeds[0]:
            report["evaluation_ms"] = {
                k: round(v, 2) for k, v in measure_evaluation(repository, args.pools).items()
            }
            print(f"one evaluation (merge + 300 prompts), median ms by pool size: {report['evaluation_ms']}")
        targets = [t for t in repository.targets() if t.kind in args.kinds]
        if args.quick:
            targets = targets[:1]
        for target in targets:
            for size in args.pools:
                start = time.perf_counter()
                case = await run_case(repository, target, size, seed, args.quick)
                accs = {m: round(100 * r["accuracy"], 1) for m, r in case["methods"].items()}
                print(
                    f"  {target.name} pool {size} ({time.perf_counter() - start:.0f} s): {accs}", flush=True
                )
                cases.append(case)
    summary = summarise(cases)
    print("\ntest accuracy (macro-F1), %, mean over targets and seeds\n")
    print(markdown(summary))
    report["summary"] = summary
    report["cases"] = cases
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one OOD target, one seed (< 60 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="repository/pool/search seeds")
    parser.add_argument("--pools", type=int, nargs="+", default=[20, 100], help="pool sizes")
    parser.add_argument(
        "--kinds", nargs="+", default=["ood", "id"], choices=["ood", "id"], help="target kinds"
    )
    parser.add_argument("--out", default=None, help="also write the full report (every case) as JSON here")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.quick:
        args.kinds = ["ood"]
    report = anyio.run(main_async, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    compact = {k: v for k, v in report.items() if k != "cases"}
    print(json.dumps(compact, separators=(",", ":")))


if __name__ == "__main__":
    main()
