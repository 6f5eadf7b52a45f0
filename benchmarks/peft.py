"""Real LoRA adapters (issue 14): Evo-Merging over PEFT adapters on the real-format world.

On the tiny Llama world of `evomerge_peft` (base and adapters trained with PEFT, cached on disk), per
(seed, out-of-domain target) and per merge form (paper: sum beta A, sum beta B; cat: stacked, no cross
terms): Evo-Merging (the default preset, sized by `fit_to_queries` to LoRAHub-style's spend) against
LoRAHub-style (800 full validation passes, fixed alpha 1), the best single adapter (by validation loss)
and PEFT's own `add_weighted_adapter` merges (linear, cat, ties, dare_linear, magnitude_prune; one
weight for all adapters from a small grid, chosen on validation loss; white-box, no spend). Test
accuracy is the share of test prompts whose highest-ranked label word is the gold one; losses are mean
token cross-entropy on completion tokens. Every figure is paired by (seed, target): mean difference,
95% t-interval and wins.

Also measured: evaluations per second of one in-place slot against rebuilding the merged adapter per
request (write the PEFT folder, `PeftModel.from_pretrained` on the base, tokenise, score: the reference
service's way), on the same model and 64 validation examples; and the round trip: the service's held-out
loss of the returned merge against the same merge materialised and reloaded with plain PEFT.

    python benchmarks/peft.py --quick   # seed 0, one target, paper form, small budgets (< 60 s once cached)
    python benchmarks/peft.py           # seeds 0-2, 2 OOD targets, both forms, both init variants

The last line printed is one JSON object: evo_minus_best_single and evo_minus_lorahub (test accuracy
points, positive when Evo-Merging is better), roundtrip_max_abs_loss_diff, evals_per_second (slot) and
evals_per_second_rebuild.
"""

# ruff: noqa: E402  (the import path is fixed before the imports: see below)
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the `peft` package: keep its own folder off the import path, so `peft` is PEFT.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import anyio
import attrs
import numpy as np
import torch
from evomerge_peft import (
    PEFT_COMBINATIONS,
    AdapterPool,
    Base,
    Example,
    Scorer,
    TokenisedSet,
    build_world,
    first_token_accuracy,
    load_base,
    load_pool,
    peft_weighted_merge,
    tokenise,
    write_adapter,
)  # fmt: skip

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    Candidate,
    EvaluationContext,
    EvoMerge,
    Split,
    fit_to_queries,
)  # fmt: skip

T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
}


def _examples(path: Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in path.read_text().splitlines()]


@attrs.frozen(eq=False)
class Case:
    """One (seed, target, variant): the loaded pool and its tokenised splits."""

    base: Base
    scorer: Scorer
    pool: AdapterPool
    adapters: dict[str, Path]
    base_dir: Path
    validation: TokenisedSet
    held_out: TokenisedSet
    test: TokenisedSet
    answers: list[int]


def objective(case: Case, form: str) -> Any:
    """The in-process objective: each candidate scored in the slot on the split (or its minibatch)."""

    async def score(candidates: list[Candidate], context: EvaluationContext) -> list[float]:
        data = case.validation if context.split == Split.VALIDATION else case.held_out
        idx = context.minibatch(len(data))
        out = []
        for c in candidates:
            with case.scorer.merged(case.pool, c.alpha, c.beta, form) as model:  # type: ignore[arg-type]
                out.append(case.scorer.loss(model, data, None if idx is None else idx.tolist())[0])
        return out

    return score


def measure(case: Case, alpha: Any, beta: Any, form: str) -> dict[str, float]:
    """Held-out loss and test accuracy (points) of a merge of the case's pool."""
    with case.scorer.merged(case.pool, alpha, beta, form) as model:  # type: ignore[arg-type]
        return {
            "held_out_loss": case.scorer.loss(model, case.held_out)[0],
            "test_accuracy": 100 * first_token_accuracy(case.scorer, model, case.test, case.answers),
        }


def measure_folder(case: Case, folder: Path) -> dict[str, float]:
    """The same for an adapter folder (PEFT's merges)."""
    single = load_pool(case.base, {"m": folder})
    with case.scorer.merged(single, [1.0], [1.0], "paper") as model:
        return {
            "validation_loss": case.scorer.loss(model, case.validation)[0],
            "held_out_loss": case.scorer.loss(model, case.held_out)[0],
            "test_accuracy": 100 * first_token_accuracy(case.scorer, model, case.test, case.answers),
        }


def speed(case: Case, repeats: int, tmp: Path) -> dict[str, float]:
    """Evaluations per second: the in-place slot against a rebuild per request."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    n = len(case.pool)
    vectors = [(rng.uniform(0.3, 1, n), rng.uniform(-0.5, 0.8, n)) for _ in range(repeats)]
    start = time.perf_counter()
    for alpha, beta in vectors:
        with case.scorer.merged(case.pool, alpha, beta, "paper") as model:
            case.scorer.loss(model, case.validation)
    slot = repeats / (time.perf_counter() - start)
    rows = _examples_cache[id(case)]
    start = time.perf_counter()
    for k, (alpha, beta) in enumerate(vectors):
        folder = write_adapter(tmp / f"rebuild-{k}", case.base, case.pool, alpha, beta, "paper", {})
        fresh = AutoModelForCausalLM.from_pretrained(case.base_dir, local_files_only=True).eval()
        model = PeftModel.from_pretrained(fresh, folder).eval()
        data = tokenise(case.base.tokenizer, rows)
        case.scorer.loss(model, data)
    rebuild = repeats / (time.perf_counter() - start)
    return {"evals_per_second": slot, "evals_per_second_rebuild": rebuild}


_examples_cache: dict[int, list[Example]] = {}


def load_case(seed: int, target_index: int, variant: str, root: Path) -> tuple[Case, str]:
    """The world of `seed` (built once, cached under `root`) and one of its OOD targets."""
    from evomerge_peft import WorldConfig

    world = build_world(WorldConfig(seed=seed), root=root, variant=variant)  # type: ignore[arg-type]
    target = world.targets[target_index]
    base = load_base(world.base)
    adapters = world.pool(target)
    splits = {s: _examples(world.data(target, s)) for s in ("validation", "held_out", "test")}
    case = Case(
        base=base,
        scorer=Scorer.of(base),
        pool=load_pool(base, adapters),
        adapters=adapters,
        base_dir=world.base,
        validation=tokenise(base.tokenizer, splits["validation"]),
        held_out=tokenise(base.tokenizer, splits["held_out"]),
        test=tokenise(base.tokenizer, splits["test"]),
        answers=[int(base.tokenizer.convert_tokens_to_ids(w)) for w in world.label_words],
    )
    _examples_cache[id(case)] = splits["validation"]
    return case, target


def run_case(
    case: Case, forms: list[str], lorahub_evals: int, grid: list[float], tmp: Path
) -> dict[str, Any]:
    """Every row of one case."""
    n = len(case.pool)
    rows: dict[str, Any] = {}
    singles = []
    for i in range(n):
        beta = np.zeros(n)
        beta[i] = 1.0
        with case.scorer.merged(case.pool, np.ones(n), beta, "paper") as model:
            singles.append(case.scorer.loss(model, case.validation)[0])
    best = int(np.argmin(singles))
    one_hot = np.zeros(n)
    one_hot[best] = 1.0
    rows["best_single"] = {**measure(case, np.ones(n), one_hot, "paper"), "adapter": case.pool.names[best]}
    examples = len(case.validation)
    spend = lorahub_evals * examples
    lorahub = attrs.evolve(LORAHUB, scale=attrs.evolve(LORAHUB.scale, max_evaluations=lorahub_evals))
    evo_config = fit_to_queries(DEFAULT, n, examples, spend)
    roundtrip = 0.0
    for form in forms:
        t0 = time.perf_counter()
        evo = anyio.run(EvoMerge(objective(case, form), n, evo_config).run)
        seconds = time.perf_counter() - t0
        rows[f"evo_{form}"] = {**measure(case, evo.alpha, evo.beta, form), "seconds": seconds,
                               "evaluations": evo.evaluations}  # fmt: skip
        folder = write_adapter(tmp / f"evo-{form}", case.base, case.pool, evo.alpha, evo.beta, form, {})  # type: ignore[arg-type]
        reloaded = _reload_loss(case, folder)
        roundtrip = max(roundtrip, abs(reloaded - rows[f"evo_{form}"]["held_out_loss"]))
        hub = anyio.run(EvoMerge(objective(case, form), n, lorahub).run)
        rows[f"lorahub_{form}"] = measure(case, hub.alpha, hub.beta, form)
    for combination in PEFT_COMBINATIONS:
        best_row: dict[str, float] | None = None
        for scale in grid:
            density = 0.5 if combination in ("ties", "dare_linear", "magnitude_prune") else None
            folder = peft_weighted_merge(case.base_dir, case.adapters, [scale / n] * n, combination,
                                         tmp / f"{combination}-{scale}", density=density)  # fmt: skip
            row = measure_folder(case, folder)
            if best_row is None or row["validation_loss"] < best_row["validation_loss"]:
                best_row = {**row, "weight_times_n": scale}
        rows[f"peft_{combination}"] = best_row
    rows["roundtrip_max_abs_loss_diff"] = roundtrip
    return rows


def _reload_loss(case: Case, folder: Path) -> float:
    """Held-out loss of a materialised folder loaded with plain `PeftModel.from_pretrained`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(case.base_dir, local_files_only=True).eval()
    model = PeftModel.from_pretrained(fresh, folder).eval()
    return case.scorer.loss(model, case.held_out)[0]


def paired(values: list[float]) -> dict[str, float]:
    """Mean, 95% t-interval half-width and wins of paired differences."""
    mean = statistics.fmean(values)
    half = (
        T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
        if len(values) > 1
        else math.nan
    )
    return {"mean": mean, "ci95": half, "wins": sum(v > 0 for v in values), "cases": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--targets", type=int, default=None, help="OOD targets per seed")
    parser.add_argument("--variants", nargs="*", default=None, choices=["own_seed", "shared_seed"])
    parser.add_argument("--cache", default=None, help="world cache folder (default: the user cache)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    targets = args.targets or (1 if quick else 2)
    variants = args.variants or (["own_seed"] if quick else ["own_seed", "shared_seed"])
    forms = ["paper"] if quick else ["paper", "cat"]
    lorahub_evals = 100 if quick else 800
    grid = [1.0] if quick else [0.5, 1.0, 2.0]
    from evomerge_peft import default_world_dir

    root = Path(args.cache) if args.cache else default_world_dir()
    results: list[dict[str, Any]] = []
    speeds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for variant in variants:
            for seed in seeds:
                for t in range(targets):
                    case, target = load_case(seed, t, variant, root)
                    if not speeds:
                        speeds = speed(case, 10 if quick else 30, tmp)
                    rows = run_case(case, forms, lorahub_evals, grid, tmp / f"{variant}-{seed}-{t}")
                    results.append({"variant": variant, "seed": seed, "target": target, "rows": rows})
                    print(json.dumps(results[-1], default=float))
    summary: dict[str, Any] = {}
    for variant in variants:
        cases = [r["rows"] for r in results if r["variant"] == variant]
        for form in forms:
            evo = [c[f"evo_{form}"]["test_accuracy"] for c in cases]
            others = ["best_single", f"lorahub_{form}"] + [f"peft_{k}" for k in PEFT_COMBINATIONS]
            for other in others:
                diffs = [e - c[other]["test_accuracy"] for e, c in zip(evo, cases, strict=True)]
                summary[f"{variant}/{form}/evo_minus_{other}"] = paired(diffs)
            for key in ["best_single", f"evo_{form}", f"lorahub_{form}"] + [
                f"peft_{k}" for k in PEFT_COMBINATIONS
            ]:
                summary[f"{variant}/{form}/mean_accuracy/{key}"] = statistics.fmean(
                    c[key]["test_accuracy"] for c in cases
                )
                summary[f"{variant}/{form}/mean_held_out_loss/{key}"] = statistics.fmean(
                    c[key]["held_out_loss"] for c in cases
                )
    print(json.dumps({"summary": summary, "python": platform.python_version(), "torch": torch.__version__}))
    first = variants[0]
    last = {
        "evo_minus_best_single": summary[f"{first}/paper/evo_minus_best_single"]["mean"],
        "evo_minus_lorahub": summary[f"{first}/paper/evo_minus_lorahub_paper"]["mean"],
        "roundtrip_max_abs_loss_diff": max(r["rows"]["roundtrip_max_abs_loss_diff"] for r in results),
        "evals_per_second": speeds["evals_per_second"],
        "evals_per_second_rebuild": speeds["evals_per_second_rebuild"],
        "cases": len(results),
    }
    print(json.dumps(last))


if __name__ == "__main__":
    main()
