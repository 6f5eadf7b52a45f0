"""Equal spend: Evo-Merging against LoRAHub-style at the same cost, and what the minibatch changes there.

`evomerge demo` and the quality table compare the two searches at LoRAHub-style's spend (800 full
validation passes), with the default preset sized to it by `engine.fit_to_queries`: the same minibatch
of 20 examples, many more generations. This benchmark asks whether that sizing is the right one, and how
much of a single case's ranking is noise:

* rows: LoRAHub-style; the default at equal spend (minibatch 20, the mean re-scored every 10
  generations, as shipped); the same with minibatches of 30 and 60, and with re-scoring every 5;
* per row: test accuracy and macro-F1, validation and test loss, queries, and the *drift*: validation
  loss of the CMA mean the search ends with minus that of the merge it returns (a long minibatch run whose
  step size grows on noise wanders away from its best point; the incumbent is kept, the budget is not);
* paired against LoRAHub-style over every (seed, OOD target), and the demo's own case (seed 0,
  ood:ner/news) with a paired bootstrap interval of the accuracy difference over its 1,000 test prompts.

    python benchmarks/equal_spend.py --quick   # seed 0, two OOD targets (< 60 s)
    python benchmarks/equal_spend.py --jobs 2  # seeds 0-9, the four OOD targets, pool 20

The last line printed is one JSON object: each row's mean test accuracy and its mean difference to
LoRAHub-style, in points.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, in workers too

import anyio
import attrs
import numpy as np
from _ood_cases import run_cases  # also puts this checkout first on sys.path

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    Candidate,
    EvoMerge,
    SearchConfig,
    fit_to_queries,
    planned_queries,
)
from evomerge_sdk.local.repository import RepositoryConfig, build_repository
from evomerge_sdk.testing import LocalObjective

DEMO_CASE = (0, "ood:ner/news")
BOOTSTRAP = 10_000


def _scale(config: SearchConfig, **changes: Any) -> SearchConfig:
    assert config.scale is not None
    return attrs.evolve(config, scale=attrs.evolve(config.scale, **changes))


ROWS: dict[str, tuple[str, SearchConfig]] = {
    "lorahub": ("LoRAHub-style (800 full passes)", LORAHUB),
    "equal": ("default at equal spend (minibatch 20, as shipped)", DEFAULT),
    "batch30": ("... minibatch 30", _scale(DEFAULT, batch_size=30)),
    "batch60": ("... minibatch 60", _scale(DEFAULT, batch_size=60)),
    "rescore5": ("... mean re-scored every 5 generations", _scale(DEFAULT, rescore_every=5)),
}


def run_job(job: tuple[int, str, int]) -> dict[str, Any]:
    """Every row on one (seed, target); per-example test correctness only for the demo's case."""
    seed, target_name, size = job
    repo = build_repository(RepositoryConfig(seed=seed))
    target = repo.target(target_name)
    pool = repo.pool(target, size, seed)
    n, examples = len(pool), len(target.validation)
    spend = planned_queries(LORAHUB, n, examples)
    rows: dict[str, Any] = {}
    for name, (_, base) in ROWS.items():
        config = base if name == "lorahub" else fit_to_queries(base, n, examples, spend)
        objective = LocalObjective(repo, pool, target)
        result = anyio.run(EvoMerge(objective, n, attrs.evolve(config, seed=seed)).run)
        test = objective.metrics(result.candidate, "test")
        validation = objective.metrics(result.candidate, "validation").loss
        final = result.stages[-1]
        end = Candidate(alpha=result.alpha, beta=final.mean) if final.name == "scale" else result.candidate
        row = {
            "accuracy": 100 * test.accuracy,
            "f1": 100 * test.macro_f1,
            "test_loss": test.loss,
            "validation_loss": validation,
            "drift": objective.metrics(end, "validation").loss - validation,
            "queries": objective.queries,
        }
        if (seed, target_name) == DEMO_CASE:
            scores = repo.answer_logprobs(objective.weights(result.candidate), target.test)
            predicted = target.test.answer_ids[np.argmax(scores, axis=1)]
            row["correct"] = (predicted == target.test.labels).astype(int).tolist()
        rows[name] = row
    return {"seed": seed, "target": target_name, "rows": rows}


def bootstrap_interval(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-example differences."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (BOOTSTRAP, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def report(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; return the summary for the JSON line."""
    head = ["row", "test acc %", "macro-F1 %", "val loss", "test loss", "drift", "queries", "vs LoRAHub"]
    print("| " + " | ".join([*head, "ahead"]) + " |")
    print("|" + " --- |" * (len(head) + 1))
    summary: dict[str, Any] = {}
    for name, (label, _) in ROWS.items():
        values = [c["rows"][name] for c in cases]
        diffs = [c["rows"][name]["accuracy"] - c["rows"]["lorahub"]["accuracy"] for c in cases]
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        ahead = sum(d > 0 for d in diffs)

        def mean(key: str, values: list[dict[str, Any]] = values) -> float:
            return statistics.fmean(v[key] for v in values)

        vs = "-" if name == "lorahub" else f"{statistics.fmean(diffs):+.2f} ± {error:.2f}"
        print(
            f"| {label} | {mean('accuracy'):.2f} | {mean('f1'):.2f} | {mean('validation_loss'):.4f} | "
            f"{mean('test_loss'):.4f} | {mean('drift'):.4f} (max {max(v['drift'] for v in values):.3f}) | "
            f"{mean('queries'):,.0f} | {vs} | {'-' if name == 'lorahub' else f'{ahead} of {len(cases)}'} |"
        )
        summary[name] = {
            "accuracy": round(mean("accuracy"), 2),
            "vs_lorahub": round(statistics.fmean(diffs), 2),
        }
    demo = next((c for c in cases if (c["seed"], c["target"]) == DEMO_CASE), None)
    if demo is not None:
        print(f"\nThe demo's case (seed {DEMO_CASE[0]}, {DEMO_CASE[1]}), paired over its test prompts:\n")
        head = ["row", "test acc %", "drift", "minus LoRAHub-style", "95% bootstrap interval"]
        print("| " + " | ".join([*head, "only it right / only LoRAHub right"]) + " |")
        print("|" + " --- |" * (len(head) + 1))
        hub = np.array(demo["rows"]["lorahub"]["correct"])
        for name, (label, _) in ROWS.items():
            if name == "lorahub":
                continue
            row = demo["rows"][name]
            diffs = 100.0 * (np.array(row["correct"]) - hub)
            low, high = bootstrap_interval(diffs)
            print(
                f"| {label} | {row['accuracy']:.1f} | {row['drift']:.3f} | {diffs.mean():+.1f} | "
                f"[{low:+.1f}, {high:+.1f}] | {(diffs > 0).sum()} / {(diffs < 0).sum()} |"
            )
    return summary


def main() -> None:
    run_cases(__doc__, "equal spend", run_job, report)


if __name__ == "__main__":
    main()
