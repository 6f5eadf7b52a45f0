"""Cost: the paper's search protocol against the SDK's default preset, on the 100-adapter pools.

For every out-of-domain target of the embedded repository, with a pool of 100 adapters, both searches run
through the in-process `LocalObjective`, which counts what a merge service would bill: queries (one
validation or held-out example scored by one candidate) and tokens (each scored example's prompt tokens
plus its answer token). Reported per target (mean over seeds): the final validation loss of the merge each
search returns (always on the whole validation split), its test loss and accuracy, and the queries and
tokens spent. Two references:

* `paper`: the `PAPER` preset, the authors' protocol as DESIGN 1.1 lists it: every candidate scored on all
  300 validation examples, 400 + 800 evaluations, held-out early stopping (patience 5).
* `paper (no early stop)`: the same without early stopping, the full 1,200 x 300 = 360,000 queries.

A plot (`benchmarks/plots/cost_curves.png`) shows, per target, the validation loss of the merge each
search would return if stopped there, against the queries spent so far (for the default preset's
minibatch stages that is the CMA mean re-scored on the whole split, measured outside the accounting).

    python benchmarks/cost.py --quick   # seed 0 (< 60 s)
    python benchmarks/cost.py           # seeds 0-4
    python benchmarks/cost.py --ideas   # which cost ideas pay (seeds 0-2, pools 20 and 100)

`--ideas` runs the default preset with one idea changed at a time, at about the same query budget: no
minibatch, minibatches of 10 or 30, no sigma scaling, the CMA mean re-scored only at the end, held-out
early stopping, a warm start from Task Arithmetic's lambda, the paper's stage 1 in front. It also reports
what the objective's per-example cache saved.

The last line is one JSON object: `query_ratio` (default / paper queries) and `loss_gap` ((default -
paper) / paper validation loss), each the median over targets of the per-target means over seeds; the
same against the paper protocol without early stopping (`query_ratio_full`, `loss_gap_full`), and the
token ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Measure this checkout's package, whichever copy of it is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import attrs
import numpy as np

from evomerge_sdk.engine import (
    DEFAULT,
    PAPER,
    EarlyStopping,
    EvoMerge,
    Progress,
    SearchConfig,
    SearchResult,
    preset,
    task_arithmetic,
)
from evomerge_sdk.local.repository import Repository, RepositoryConfig, Target, build_repository
from evomerge_sdk.testing import LocalObjective

METHODS: dict[str, SearchConfig] = {
    "paper": PAPER,
    "paper_full": attrs.evolve(PAPER, name="paper (no early stop)", early_stopping=None),
    "default": DEFAULT,
}
PLOT = Path(__file__).resolve().parent / "plots" / "cost_curves.png"


def _outcome(result: SearchResult, objective: LocalObjective) -> dict[str, float]:
    """What every run reports: the merge's validation and test scores and what finding it cost."""
    test = objective.metrics(result.candidate, "test")
    return {
        "validation_loss": result.loss,
        "test_loss": test.loss,
        "test_accuracy": 100 * test.accuracy,
        "queries": objective.queries,
        "tokens": objective.tokens,
    }


async def run_one(
    repo: Repository, target: Target, size: int, seed: int, config: SearchConfig
) -> dict[str, Any]:
    """One search; its final losses, its cost and its curve of (queries, validation loss held)."""
    pool = repo.pool(target, size, seed)
    objective = LocalObjective(repo, pool, target)
    curve: list[tuple[int, float]] = []

    def on_progress(p: Progress) -> None:
        # What the search would return if stopped now: its incumbent, or (minibatch stages) its mean
        # re-scored on the whole split. Measured outside the accounting.
        held = p.best_loss
        stage = config.denoise if p.stage == "denoise" else config.scale
        if p.mean_candidate is not None and stage is not None and stage.batch_size is not None:
            held = min(held, objective.metrics(p.mean_candidate, "validation").loss)
        curve.append((objective.queries, held))

    started = time.perf_counter()
    result = await EvoMerge(
        objective, len(pool), attrs.evolve(config, seed=seed), on_progress=on_progress
    ).run()
    curve.append((objective.queries, result.loss))
    return {
        **_outcome(result, objective),
        "evaluations": result.evaluations + result.held_out_evaluations,
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }


def plot(runs: list[dict[str, Any]], targets: list[str], path: Path) -> None:
    """Validation loss held against queries, one panel per target, every seed as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"paper": "tab:red", "paper_full": "tab:orange", "default": "tab:blue"}
    labels = {"paper": "paper protocol", "paper_full": "paper, no early stop", "default": "default preset"}
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for method, colour in colours.items():
            mine = [r for r in runs if r["target"] == target and r["method"] == method]
            for i, run in enumerate(mine):
                q, loss = zip(*run["curve"], strict=True)
                ax.plot(
                    np.array(q) / 1000,
                    loss,
                    color=colour,
                    lw=1.2,
                    alpha=0.75,
                    label=labels[method] if i == 0 else None,
                )
        finals = [r["validation_loss"] for r in runs if r["target"] == target]
        # Stage 1 of the paper protocol barely moves the loss: clip its plateau to show the descent.
        ax.set_ylim(0.95 * min(finals), 1.5 * max(finals))
        ax.set_title(target)
        ax.set_xlabel("queries (thousands)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss held")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- which cost ideas pay: the default preset with one idea changed at a time ------------------------------
def idea_variants() -> dict[str, tuple[str, SearchConfig]]:
    """Variants of the default preset at about its query budget (19,500), one idea changed each."""
    s = DEFAULT.scale
    assert s is not None

    def scale(**changes: Any) -> SearchConfig:
        return attrs.evolve(DEFAULT, scale=attrs.evolve(s, **changes))

    return {
        "default": ("the default preset (minibatches of 20, 900 evaluations)", DEFAULT),
        "full_batch": (
            "no minibatch: all 300 examples per evaluation, 60 evaluations",
            scale(batch_size=None, max_evaluations=60),
        ),
        "batch_10": ("minibatches of 10, 1,800 evaluations", scale(batch_size=10, max_evaluations=1800)),
        "batch_30": ("minibatches of 30, 600 evaluations", scale(batch_size=30, max_evaluations=600)),
        "no_sigma_scaling": ("sigma 0.07 for any pool size", scale(sigma_scaling="none")),
        "mean_at_end_only": ("CMA mean re-scored only at the end", scale(rescore_every=0)),
        "early_stopping": (
            "+ held-out early stopping (patience 20, mean re-scored every 5th generation)",
            attrs.evolve(scale(rescore_every=5), early_stopping=EarlyStopping(patience=20)),
        ),
        "warm_start": ("+ warm start from Task Arithmetic's lambda (11 full evaluations)", DEFAULT),
        "two_stage": ("+ stage 1 (denoising): the paper's two stages, 80 + 820", preset("two-stage")),
    }


async def run_idea(repo: Repository, target: Target, size: int, seed: int, name: str) -> dict[str, float]:
    """One variant on one case: final validation and test loss, test accuracy, queries, tokens."""
    pool = repo.pool(target, size, seed)
    objective = LocalObjective(repo, pool, target)
    config = attrs.evolve(idea_variants()[name][1], seed=seed)
    if name == "warm_start":
        assert config.scale is not None
        lam = float((await task_arithmetic(objective, len(pool))).beta[0])
        # Pay for the warm start out of the stage's budget, in whole generations of minibatch evaluations.
        pop = config.scale.popsize or 20
        spent = -(-objective.queries // ((config.scale.batch_size or 300) * pop)) * pop
        scale = attrs.evolve(config.scale, start=lam, max_evaluations=config.scale.max_evaluations - spent)
        config = attrs.evolve(config, scale=scale)
    result = await EvoMerge(objective, len(pool), config).run()
    return {
        **_outcome(result, objective),
        "cached": objective.usage.cached,
    }


def ideas(args: argparse.Namespace) -> None:
    """Print, per pool size, every variant's means over the OOD targets and seeds; JSON last."""
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    pools = [20] if args.quick else [20, args.pool]
    variants = idea_variants()
    rows: dict[tuple[int, str], list[dict[str, float]]] = {}
    for seed in seeds:
        repo = build_repository(RepositoryConfig(seed=seed))
        for target in [t for t in repo.targets() if t.kind == "ood"]:
            for size in pools:
                for name in variants:
                    rows.setdefault((size, name), []).append(
                        anyio.run(run_idea, repo, target, size, seed, name)
                    )
            print(f"seed {seed} {target.name} done", flush=True)
    summary: dict[str, dict[str, list[float]]] = {}
    for size in pools:
        print(f"\npool of {size} adapters, OOD targets, mean over targets and {len(seeds)} seed(s)\n")
        print("| variant | validation loss | test loss | test accuracy % | queries | tokens | cached |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, (label, _) in variants.items():
            got = rows[(size, name)]
            m = {k: statistics.fmean(r[k] for r in got) for k in got[0]}
            print(
                f"| {label} | {m['validation_loss']:.4f} | {m['test_loss']:.4f} | {m['test_accuracy']:.1f} | "
                f"{m['queries']:,.0f} | {m['tokens']:,.0f} | {m['cached']:,.0f} |"
            )
            summary.setdefault(str(size), {})[name] = [round(m["validation_loss"], 4), round(m["queries"])]
    print(json.dumps(summary, separators=(",", ":")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only (< 60 s)")
    parser.add_argument(
        "--ideas",
        action="store_true",
        help="which cost ideas pay: variants of the default preset (pools 20, 100)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--pool", type=int, default=100, help="pool size (100+ adapters)")
    parser.add_argument(
        "--plot", default=None, help=f"PNG path ('' for none; default {PLOT.name}, none with --quick)"
    )
    parser.add_argument("--out", default=None, help="write every run as JSON here")
    args = parser.parse_args()
    if args.ideas:
        ideas(args)
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        repo = build_repository(RepositoryConfig(seed=seed))
        for target in [t for t in repo.targets() if t.kind == "ood"]:
            for method, config in METHODS.items():
                run = anyio.run(run_one, repo, target, args.pool, seed, config)
                runs.append({"seed": seed, "target": target.name, "method": method, **run})
                print(
                    f"seed {seed} {target.name} {method}: validation {run['validation_loss']:.4f}, "
                    f"test {run['test_loss']:.4f} ({run['test_accuracy']:.1f}%), {run['queries']:,} queries, "
                    f"{run['tokens']:,} tokens, {run['seconds']:.1f} s",
                    flush=True,
                )
    targets = sorted({r["target"] for r in runs}, key=[r["target"] for r in runs].index)

    def mean(target: str, method: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs if r["target"] == target and r["method"] == method)

    keys = ("validation_loss", "test_loss", "test_accuracy", "queries", "tokens")
    print(f"\npool of {args.pool} adapters, mean over {len(seeds)} seed(s)\n")
    head = ["target", "method", "validation loss", "test loss", "test accuracy %", "queries", "tokens"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for target in targets:
        for method in METHODS:
            v = [mean(target, method, k) for k in keys]
            print(
                f"| {target} | {METHODS[method].name} | {v[0]:.4f} | {v[1]:.4f} | {v[2]:.1f} | "
                f"{v[3]:,.0f} | {v[4]:,.0f} |"
            )
    summary: dict[str, Any] = {}
    for suffix, reference in (("", "paper"), ("_full", "paper_full")):
        ratios = [mean(t, "default", "queries") / mean(t, reference, "queries") for t in targets]
        tokens = [mean(t, "default", "tokens") / mean(t, reference, "tokens") for t in targets]
        gaps = [
            (mean(t, "default", "validation_loss") - mean(t, reference, "validation_loss"))
            / mean(t, reference, "validation_loss")
            for t in targets
        ]
        test_gaps = [
            (mean(t, "default", "test_loss") - mean(t, reference, "test_loss"))
            / mean(t, reference, "test_loss")
            for t in targets
        ]
        summary[f"query_ratio{suffix}"] = round(statistics.median(ratios), 4)
        summary[f"loss_gap{suffix}"] = round(statistics.median(gaps), 4)
        summary[f"token_ratio{suffix}"] = round(statistics.median(tokens), 4)
        summary[f"test_loss_gap{suffix}"] = round(statistics.median(test_gaps), 4)
    print("\nper target (default vs paper): query ratio, validation-loss gap")
    for t in targets:
        ratio = mean(t, "default", "queries") / mean(t, "paper", "queries")
        gap = mean(t, "default", "validation_loss") / mean(t, "paper", "validation_loss") - 1
        print(f"  {t}: {ratio:.3f}, {gap:+.4f}")
    where = args.plot if args.plot is not None else ("" if args.quick else str(PLOT))
    if where:
        plot(runs, targets, Path(where))
        print(f"plot: {where}")
    elapsed = time.perf_counter() - started
    print(
        f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, {elapsed:.0f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(runs))
    summary |= {"seeds": len(seeds), "pool": args.pool, "elapsed_s": round(elapsed, 1)}
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
