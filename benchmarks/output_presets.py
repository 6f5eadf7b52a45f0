"""Output space: which search to run on cached answer scores (DESIGN 1.2), over many cases.

`evomerge demo --mode output` runs one case through the OpenAI-compatible route. This benchmark asks the
question behind its table over seeds x OOD targets: on the same cached scores, how do the default search
(stage 2 only, alpha = 1), the two-stage search (the paper's stage 1 in front, same evaluations), the paper
protocol and the LoRAHub-style search compare? The scores are the embedded repository's exact next-token
log-probabilities of the answer options (what the chat route's `top_logprobs` carries when every option
is in the top 20), for the base model (the reference) and every pool adapter. Every search scores every
candidate on all validation examples (the scores are cached: a query costs nothing), as the demo does.

    python benchmarks/output_presets.py --quick   # seed 0, two OOD targets (< 60 s)
    python benchmarks/output_presets.py --jobs 2  # seeds 0-9, the four OOD targets, pool 20

The last line printed is one JSON object: each row's mean test accuracy and validation loss, and its
mean accuracy difference to LoRAHub-style, in points.
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

from evomerge_sdk.engine import EvoMerge, SearchConfig, preset
from evomerge_sdk.local.repository import Repository, RepositoryConfig, build_repository
from evomerge_sdk.local.tasks import Examples
from evomerge_sdk.objectives import OutputScores, OutputSpaceObjective


def _whole_split(config: SearchConfig) -> SearchConfig:
    # The demo's change to a preset in output space: no minibatches, no held-out early stopping.
    def stage(s: Any) -> Any:
        return None if s is None else attrs.evolve(s, batch_size=None)

    return attrs.evolve(config, denoise=stage(config.denoise), scale=stage(config.scale), early_stopping=None)


ROWS: dict[str, str] = {
    "lorahub": "LoRAHub-style (800 evaluations)",
    "default": "default (stage 2 only, 900; the demo's)",
    "two-stage": "two-stage (80 + 820)",
    "paper": "paper protocol (400 + 800)",
}


def scores(repo: Repository, pool: list[str], examples: Examples) -> OutputScores:
    """The pool's and the base model's answer-option log-probabilities, and the gold option indices."""
    position = {int(token): i for i, token in enumerate(examples.answer_ids)}
    return OutputScores(
        pool=np.stack([repo.answer_logprobs(repo.single(name), examples) for name in pool]),
        reference=repo.answer_logprobs(repo.base, examples),
        labels=np.array([position[int(token)] for token in examples.labels]),
    )


def run_job(job: tuple[int, str, int]) -> dict[str, Any]:
    """Every row on one (seed, target)."""
    seed, target_name, size = job
    repo = build_repository(RepositoryConfig(seed=seed))
    target = repo.target(target_name)
    pool = repo.pool(target, size, seed)
    validation, test = scores(repo, pool, target.validation), scores(repo, pool, target.test)
    rows: dict[str, Any] = {}
    for name in ROWS:
        config = attrs.evolve(_whole_split(preset(name)), seed=seed)
        result = anyio.run(EvoMerge(OutputSpaceObjective(validation), len(pool), config).run)
        metrics = test.metrics(result.alpha, result.beta)
        rows[name] = {
            "accuracy": 100 * metrics["accuracy"],
            "f1": 100 * metrics["macro_f1"],
            "test_loss": metrics["loss"],
            "validation_loss": validation.metrics(result.alpha, result.beta)["loss"],
            "evaluations": result.evaluations,
        }
    return {"seed": seed, "target": target_name, "rows": rows}


def report(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the table; return the summary for the JSON line."""
    head = ["row", "test acc %", "macro-F1 %", "val loss", "test loss", "evaluations", "vs LoRAHub (acc)"]
    print("| " + " | ".join([*head, "ahead"]) + " |")
    print("|" + " --- |" * (len(head) + 1))
    summary: dict[str, Any] = {}
    for name, label in ROWS.items():
        values = [c["rows"][name] for c in cases]
        diffs = [c["rows"][name]["accuracy"] - c["rows"]["lorahub"]["accuracy"] for c in cases]
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0

        def mean(key: str, values: list[dict[str, Any]] = values) -> float:
            return statistics.fmean(v[key] for v in values)

        first = name == "lorahub"
        print(
            f"| {label} | {mean('accuracy'):.2f} | {mean('f1'):.2f} | {mean('validation_loss'):.4f} | "
            f"{mean('test_loss'):.4f} | {mean('evaluations'):,.0f} | "
            f"{'-' if first else f'{statistics.fmean(diffs):+.2f} ± {error:.2f}'} | "
            f"{'-' if first else f'{sum(d > 0 for d in diffs)} of {len(cases)}'} |"
        )
        summary[name] = {
            "accuracy": round(mean("accuracy"), 2),
            "validation_loss": round(mean("validation_loss"), 4),
            "vs_lorahub": round(statistics.fmean(diffs), 2),
        }
    return summary


def main() -> None:
    run_cases(__doc__, "output space", run_job, report)


if __name__ == "__main__":
    main()
