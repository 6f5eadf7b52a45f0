"""Quality: the shape of the paper's main and ablation tables, on the embedded repository.

Rows: Evo-Merging with the SDK's default preset, the same preset sized to the LoRAHub-style row's
spend (`engine.fit_to_queries`: the two searches at equal cost), and with the paper's protocol; the
best single adapter of the pool and the uniform merge; white-box Task Arithmetic, TIES and DARE (their
hyper-parameters chosen on the validation split from a small grid, as the paper chose its baselines'); a
LoRAHub-style search; random search; and the paper's three ablations at the default's budget. The default
preset has no stage 1 (denoising did not pay over cases), so the denoising ablation runs the other way:
the paper's two stages (`preset("two-stage")`, stage 1 with 80 of the 900 evaluations) against the
default; "no scaling" is the two-stage search's stage 1 alone with the whole budget; "no negative betas"
is the default with beta bounded below by 0.
Every row runs on the same repositories, targets, pools and seeds, and is chosen on validation data only.

Columns: every target of the repository (4 out-of-domain, 4 in-domain), and the averages, of the metric on
the targets' held-out *test* prompts (1,000 per target, never seen by any selection): accuracy (the most
likely answer within the label set) by default, or macro-F1 with `--metric f1`; mean and standard
deviation over seeds. A seed picks the repository (its world and weights), the pool and the search seed.
Also the cost of each row: queries (one example scored by one candidate; white-box rows pay one
validation pass per grid point) and tokens (prompt + answer token of every example scored), per search.
Claims are the paired tables: per (seed, OOD target), a row minus another, the mean with its 95%
interval (Student's t over the cases) and wins out of cases (`benchmarks/_paired.py`).

    python benchmarks/quality.py --quick   # pool 20, seed 0, two OOD targets (< 60 s)
    python benchmarks/quality.py --jobs 2  # pools 20 and 100, seeds 0-4, every target (background it)
    python benchmarks/quality.py --world distinct   # every adapter's A from its own seed

The last line printed is one JSON object mapping each row to its average held-out (test) metric over the
out-of-domain targets, in percent (averaged over the pools when there are several; each pool's own line
is printed under its table), and, per pool, the paired OOD accuracy differences `evo_minus_lorahub`
(default - LoRAHub-style), `evo_equal_spend_minus_lorahub` and `evo_minus_no_denoising` (the two-stage
search minus its no-denoising ablation, which is the default: what stage 1 buys), each as
{"mean", "ci95", "se", "wins", "cases"}; and the world.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Measure this checkout's package, whichever copy of it is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _paired
import anyio
import attrs
import numpy as np

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    PAPER,
    Candidate,
    EvoMerge,
    SearchConfig,
    SearchResult,
    ablations,
    best_single,
    fit_to_queries,
    planned_queries,
    preset,
    random_search,
    uniform_merge,
)
from evomerge_sdk.local import whitebox
from evomerge_sdk.local.repository import Repository, RepositoryConfig, Target, build_repository
from evomerge_sdk.testing import LocalObjective

ROWS: dict[str, str] = {
    "evo_default": "Evo-Merging (default preset)",
    "evo_equal_spend": "Evo-Merging (default, at LoRAHub-style's spend)",
    "evo_paper": "Evo-Merging (paper protocol)",
    "best_single": "best single adapter",
    "uniform": "uniform merge",
    "task_arithmetic": "Task Arithmetic (white-box)",
    "ties": "TIES (white-box)",
    "dare": "DARE (white-box)",
    "lorahub": "LoRAHub-style",
    "random_search": "random search",
    "two_stage": "Evo-Merging, two stages (+ denoising)",
    "no_scaling": "Evo-Merging w/o scaling",
    "no_negative_betas": "Evo-Merging w/o negative betas",
}
RANDOM_SEARCH_EVALUATIONS = 1200
"""Random search gets the paper protocol's budget."""


def search_rows() -> dict[str, SearchConfig]:
    """The configs of the search rows, every ablation at the default's budget. The default has no stage
    1 (it did not pay), so the denoising ablation runs the other way: the paper's two stages against the
    default, which is their "no denoising"; "no scaling" is the two-stage search's stage 1 alone."""
    return {
        "evo_default": DEFAULT,
        "evo_paper": PAPER,
        "lorahub": LORAHUB,
        "two_stage": preset("two-stage"),
        "no_scaling": ablations(preset("two-stage"), keep_budget=True)["no_scaling"],
        "no_negative_betas": preset("default/no_negative_betas"),
    }


@attrs.frozen
class Row:
    """One method on one case: test metrics, validation loss and cost."""

    accuracy: float
    f1: float
    test_loss: float
    validation_loss: float
    queries: int
    tokens: int
    seconds: float
    alpha_by_role: dict[str, float] | None = None
    beta_by_role: dict[str, float] | None = None


Runner = Callable[[LocalObjective], Awaitable[SearchResult]]


def measure(objective: LocalObjective, candidate: Candidate, started: float) -> Row:
    """Test metrics and validation loss of a merge (not counted as queries), with what it cost."""
    test = objective.metrics(candidate, "test")
    return Row(
        accuracy=100 * test.accuracy,
        f1=100 * test.macro_f1,
        test_loss=test.loss,
        validation_loss=objective.metrics(candidate, "validation").loss,
        queries=objective.queries,
        tokens=objective.tokens,
        seconds=time.perf_counter() - started,
    )


def whitebox_row(repo: Repository, pool: Sequence[str], target: Target, method: str, seed: int) -> Row:
    """A white-box merge tuned on validation loss; each grid point costs one validation pass."""
    started = time.perf_counter()
    vectors = whitebox.TaskVectors(repo, pool)
    tuned = whitebox.tune(vectors, method, target.validation, seed=seed)
    points = len(whitebox.default_grid(method, len(pool)))
    test = repo.evaluate(tuned.weights, target.test)
    return Row(
        accuracy=100 * test.accuracy,
        f1=100 * test.macro_f1,
        test_loss=test.loss,
        validation_loss=tuned.validation.loss,
        queries=points * len(target.validation),
        tokens=points * int((target.validation.lengths + 1).sum()),
        seconds=time.perf_counter() - started,
    )


async def run_case(
    repo: Repository, target: Target, size: int, seed: int, rows: Sequence[str]
) -> dict[str, Row]:
    """Every requested row on one (target, pool size, seed)."""
    pool = repo.pool(target, size, seed)
    n = len(pool)
    configs = search_rows()
    runners: dict[str, Runner] = {
        "best_single": lambda obj: best_single(obj, n),
        "uniform": lambda obj: uniform_merge(obj, n),
        "random_search": lambda obj: random_search(
            obj, n, max_evaluations=RANDOM_SEARCH_EVALUATIONS, seed=seed
        ),
    }

    def evo(config: SearchConfig) -> Runner:
        return lambda obj: EvoMerge(obj, n, attrs.evolve(config, seed=seed)).run()

    runners |= {name: evo(config) for name, config in configs.items()}
    # The default preset sized to what LoRAHub-style spends: the two search methods at equal cost.
    examples = len(target.validation)
    equal = fit_to_queries(DEFAULT, n, examples, planned_queries(LORAHUB, n, examples))
    runners["evo_equal_spend"] = evo(attrs.evolve(equal, name="default@lorahub-spend"))
    out: dict[str, Row] = {}
    for name in rows:
        if name in ("task_arithmetic", "ties", "dare"):
            out[name] = whitebox_row(repo, pool, target, name, seed)
            continue
        started = time.perf_counter()
        objective = LocalObjective(repo, pool, target)
        result = await runners[name](objective)
        row = measure(objective, result.candidate, started)
        if name in ("evo_default", "evo_paper", "two_stage"):
            # Where the coefficients went, by what each adapter is to the target (denoising's evidence).
            row = attrs.evolve(
                row,
                alpha_by_role=by_role(repo, target, pool, result.alpha),
                beta_by_role=by_role(repo, target, pool, result.beta),
            )
        out[name] = row
    return out


def by_role(repo: Repository, target: Target, pool: Sequence[str], values: np.ndarray) -> dict[str, float]:
    """Mean of one coefficient per pool adapter, by the adapter's role towards the target."""
    groups: dict[str, list[float]] = {}
    for name, value in zip(pool, values, strict=True):
        groups.setdefault(repo.role(name, target), []).append(float(value))
    return {role: round(statistics.fmean(v), 4) for role, v in sorted(groups.items())}


def run_job(
    job: tuple[int, str, int, tuple[str, ...], str],
) -> tuple[int, str, int, dict[str, dict[str, Any]]]:
    """One case in a worker process (repositories come from the build cache after the first build)."""
    seed, target_name, size, rows, world = job
    repo = build_repository(RepositoryConfig(seed=seed, lora_init=world))
    result = anyio.run(run_case, repo, repo.target(target_name), size, seed, rows)
    return seed, target_name, size, {k: attrs.asdict(v) for k, v in result.items()}


# -- tables ---------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> str:
    """'mean ± sd' (sample sd; a single value shows no sd)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(
    cases: list[dict[str, Any]], size: int, metric: str, rows: Sequence[str]
) -> tuple[str, dict[str, float]]:
    """Markdown table for one pool size, and each row's mean OOD average."""
    mine = [c for c in cases if c["pool"] == size]
    seeds = sorted({c["seed"] for c in mine})
    targets = sorted({(c["kind"] != "ood", c["target"]) for c in mine})
    names = [t for _, t in targets]
    kinds = {c["target"]: c["kind"] for c in mine}
    by = {(c["seed"], c["target"]): c["rows"] for c in mine}
    head = ["method", *names, "OOD avg", "ID avg", "queries", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ood_avg: dict[str, float] = {}
    for row in rows:
        cells = [ROWS[row]]
        for t in names:
            cells.append(mean_sd([by[(s, t)][row][metric] for s in seeds if (s, t) in by]))
        for kind in ("ood", "id"):
            per_seed = [
                statistics.fmean(by[(s, t)][row][metric] for t in names if kinds[t] == kind and (s, t) in by)
                for s in seeds
                if any(kinds[t] == kind and (s, t) in by for t in names)
            ]
            cells.append(mean_sd(per_seed) if per_seed else "-")
            if kind == "ood" and per_seed:
                ood_avg[row] = round(statistics.fmean(per_seed), 2)
        every = [by[(s, t)][row] for s in seeds for t in names if (s, t) in by]
        cells.append(f"{statistics.fmean(r['queries'] for r in every):,.0f}")
        cells.append(f"{statistics.fmean(r['tokens'] for r in every):,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), ood_avg


def paired_table(
    cases: list[dict[str, Any]], size: int, rows: Sequence[str], base: str = "evo_default"
) -> str:
    """Markdown: mean (base - row) on OOD cases with its 95% interval, for every metric, and how often the
    base row is ahead on accuracy. A difference whose interval holds zero is a tie, not a ranking."""
    mine = [c for c in cases if c["pool"] == size and c["kind"] == "ood"]
    metrics = (("accuracy", 1), ("f1", 1), ("test_loss", 3), ("validation_loss", 3))
    head = "| row | accuracy | macro-F1 | test loss | validation loss | base row ahead (accuracy) |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row == base or not mine:
            continue
        cells = [ROWS[row]]
        for key, digits in metrics:
            diff = _paired.paired([c["rows"][base][key] - c["rows"][row][key] for c in mine], digits)
            ci = diff["ci95"]
            cells.append(
                f"{diff['mean']:+.{digits}f}"
                + ("" if ci is None else f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]")
            )
        ahead = sum(c["rows"][base]["accuracy"] > c["rows"][row]["accuracy"] for c in mine)
        cells.append(f"{ahead} of {len(mine)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences(cases: list[dict[str, Any]], size: int, rows: Sequence[str]) -> dict[str, Any]:
    """The JSON line's paired accuracy differences on one pool's OOD cases (rows that ran)."""
    mine = [c for c in cases if c["pool"] == size and c["kind"] == "ood"]
    pairs = {
        "evo_minus_lorahub": ("evo_default", "lorahub"),
        "evo_equal_spend_minus_lorahub": ("evo_equal_spend", "lorahub"),
        # What stage 1 buys: the two-stage search minus its "no denoising" ablation, the default.
        "evo_minus_no_denoising": ("two_stage", "evo_default"),
    }
    out: dict[str, Any] = {}
    for key, (a, b) in pairs.items():
        if mine and a in rows and b in rows:
            out[key] = _paired.paired([c["rows"][a]["accuracy"] - c["rows"][b]["accuracy"] for c in mine])
    return out


def role_means(cases: list[dict[str, Any]], size: int, row: str, key: str) -> dict[str, float]:
    """A coefficient's mean by adapter role over every case of one pool size."""
    groups: dict[str, list[float]] = {}
    for case in cases:
        found = case["rows"].get(row)
        if case["pool"] == size and found and found[key]:
            for role, value in found[key].items():
                groups.setdefault(role, []).append(value)
    return {role: round(statistics.fmean(v), 3) for role, v in sorted(groups.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pool 20, seed 0, two OOD targets (< 60 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--pools", type=int, nargs="+", default=None)
    parser.add_argument(
        "--targets", nargs="+", default=None, help="target names, or 'ood' for every OOD one (default: all)"
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--metric", choices=["accuracy", "f1"], default="accuracy")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", default=None, help="write every case as JSON here")
    parser.add_argument(
        "--world",
        choices=["shared", "distinct"],
        default="shared",
        help="adapters' A initialisation: one shared (the default world) or each its own (as PEFT trains)",
    )
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    pools = args.pools or ([20] if args.quick else [20, 100])
    started = time.perf_counter()
    # Fill the build cache once.
    repos = {s: build_repository(RepositoryConfig(seed=s, lora_init=args.world)) for s in seeds}
    all_targets = repos[seeds[0]].targets()
    if args.targets == ["ood"]:
        targets = [t for t in all_targets if t.kind == "ood"]
    elif args.targets:
        targets = [repos[seeds[0]].target(t) for t in args.targets]
    elif args.quick:
        targets = [t for t in all_targets if t.kind == "ood"][:2]
    else:
        targets = list(all_targets)
    jobs = [(s, t.name, p, tuple(args.rows), args.world) for p in pools for s in seeds for t in targets]
    print(
        f"{len(jobs)} cases: {args.world}-A world, pools {pools}, seeds {seeds}, "
        f"targets {[t.name for t in targets]}",
        flush=True,
    )
    cases: list[dict[str, Any]] = []
    kinds = {t.name: t.kind for t in all_targets}

    def collect(done: tuple[int, str, int, dict[str, dict[str, Any]]]) -> None:
        seed, target, size, rows = done
        cases.append({"seed": seed, "target": target, "kind": kinds[target], "pool": size, "rows": rows})
        accs = {k: round(v[args.metric], 1) for k, v in rows.items()}
        print(f"  seed {seed} {target} pool {size}: {accs}", flush=True)

    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as workers:
            for done in workers.imap_unordered(run_job, jobs):
                collect(done)
    else:
        for job in jobs:
            collect(run_job(job))
    elapsed = time.perf_counter() - started
    label = "accuracy" if args.metric == "accuracy" else "macro-F1"
    per_pool: dict[int, dict[str, float]] = {}
    for size in pools:
        text, per_pool[size] = table(cases, size, args.metric, args.rows)
        print(f"\npool of {size} adapters: test {label} (%), mean ± sd over {len(seeds)} seed(s)\n")
        print(text)
        print(f"OOD averages, pool {size}: " + json.dumps(per_pool[size], separators=(",", ":")))
        other = "f1" if args.metric == "accuracy" else "accuracy"
        _, averages = table(cases, size, other, args.rows)
        print(f"OOD averages of {other}, pool {size}: " + json.dumps(averages, separators=(",", ":")))
    for size in pools:
        print(f"\npool {size}, OOD targets: the default preset minus each row, paired by (seed, target)\n")
        print(paired_table(cases, size, args.rows))
        if "evo_equal_spend" in args.rows:
            print(f"\npool {size}, OOD targets: the default at LoRAHub-style's spend minus each row\n")
            print(paired_table(cases, size, args.rows, base="evo_equal_spend"))
    for size in pools:
        for row in ("evo_default", "evo_paper", "two_stage"):
            for coef in ("alpha_by_role", "beta_by_role"):
                means = role_means(cases, size, row, coef)
                print(f"{ROWS[row]}, pool {size}, mean {coef.replace('_', ' ')}: {means}")
    # The last line: each row's OOD average, over the pools when there are several.
    summary: dict[str, Any] = {
        row: round(statistics.fmean(p[row] for p in per_pool.values()), 2) for row in args.rows
    }
    # Beside them, the paired accuracy differences per pool: mean, 95% interval, wins of OOD cases.
    for size in pools:
        for key, diff in differences(cases, size, args.rows).items():
            summary.setdefault(key, {})[str(size)] = diff
    summary["world"] = args.world
    print(
        f"\n{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, {elapsed:.0f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"metric": args.metric, "cases": cases}, indent=1))
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
