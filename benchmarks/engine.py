"""Engine benchmark: this CMA-ES against pycma (`cma`) at the same population size.

1. Evaluations to reach f < 1e-8 on sphere, ellipsoid (condition 1e6) and Rosenbrock in 10 and 20
   dimensions, median over seeds. Both start from the same mean and sigma (sphere/ellipsoid: a uniform
   draw in [-1, 1]^N per seed; Rosenbrock: the origin), sigma0 = 0.5, default population 4 + 3 ln N, and
   both keep their own default termination; a run that terminates before the target (Rosenbrock's local
   optimum catches a share of runs of either implementation) counts as a failure. The median is over
   successful runs; the success counts and ERT (all evaluations spent / successes) are printed too.
2. Wall time of one ask+tell generation at N = 100, 200 and 1000 (the fitness is computed outside the
   timer), median over generations; the mean is printed too, since the eigendecomposition every few
   generations (lazy in both) is what the median leaves out.

The last printed line is one JSON object with `evals_ratio_vs_pycma` (ours / pycma, geometric mean over
the six problems) and `gen_time_ratio_vs_pycma` (ours / pycma, geometric mean over the three N).

    python benchmarks/engine.py --quick     # < 60 s: 2 seeds, fewer timed generations
    python benchmarks/engine.py             # full: 10 seeds (RESULTS.md)
"""

from __future__ import annotations

import os

# One BLAS thread for both contenders: on a shared 2-core machine, spinning BLAS threads turn other
# processes' load into 10x timing noise. Set OPENBLAS_NUM_THREADS yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import cma
import numpy as np

from evomerge_sdk.engine import CMA, default_popsize

TARGET = 1e-8
MAX_EVALS = 100_000
Fitness = Callable[[np.ndarray], np.ndarray]


def sphere(x: np.ndarray) -> np.ndarray:
    return np.sum(x**2, axis=-1)


def ellipsoid(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    return np.sum(10 ** (6 * np.arange(n) / (n - 1)) * x**2, axis=-1)


def rosenbrock(x: np.ndarray) -> np.ndarray:
    return np.sum(100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2, axis=-1)


PROBLEMS: dict[str, Fitness] = {"sphere": sphere, "ellipsoid": ellipsoid, "rosenbrock": rosenbrock}


def start(problem: str, n: int, seed: int) -> np.ndarray:
    if problem == "rosenbrock":
        return np.zeros(n)
    return np.random.default_rng(seed).uniform(-1, 1, n)


def ours_to_target(f: Fitness, x0: np.ndarray, seed: int) -> tuple[int, bool]:
    es = CMA(x0, 0.5, seed=seed)
    while es.evaluations < MAX_EVALS:
        values = f(es.ask())
        es.tell(values)
        if values.min() < TARGET:
            return es.evaluations, True
        if es.stop() is not None:
            break
    return es.evaluations, False


def pycma_to_target(f: Fitness, x0: np.ndarray, seed: int) -> tuple[int, bool]:
    es = cma.CMAEvolutionStrategy(
        x0, 0.5, {"seed": seed + 1000, "popsize": default_popsize(x0.size), "verbose": -9}
    )
    evals = 0
    while evals < MAX_EVALS:
        xs = es.ask()
        values = f(np.asarray(xs))
        es.tell(xs, values.tolist())
        evals += len(xs)
        if values.min() < TARGET:
            return evals, True
        if es.stop():
            break
    return evals, False


def summarise(runs: list[tuple[int, bool]]) -> dict[str, float]:
    wins = [e for e, ok in runs if ok]
    spent = sum(e for e, _ in runs)
    return {
        "median": float(np.median(wins)) if wins else math.inf,
        "successes": len(wins),
        "ert": spent / len(wins) if wins else math.inf,
    }


def evals_table(seeds: int) -> tuple[list[dict[str, Any]], float]:
    rows = []
    for problem, f in PROBLEMS.items():
        for n in (10, 20):
            ours = summarise([ours_to_target(f, start(problem, n, s), s) for s in range(seeds)])
            ref = summarise([pycma_to_target(f, start(problem, n, s), s) for s in range(seeds)])
            rows.append(
                {
                    "problem": problem,
                    "n": n,
                    "ours": ours,
                    "pycma": ref,
                    "ratio": ours["median"] / ref["median"],
                }
            )
    ratio = math.exp(float(np.mean([math.log(r["ratio"]) for r in rows])))
    return rows, ratio


def time_generations(n: int, generations: int, warmup: int) -> tuple[list[float], list[float]]:
    """ask+tell wall times of both, one generation each in turn (who goes first alternates), so both
    see the same machine load."""
    ours = CMA(np.zeros(n), 0.5, seed=1)
    ref = cma.CMAEvolutionStrategy(
        np.zeros(n), 0.5, {"seed": 1, "popsize": default_popsize(n), "verbose": -9}
    )
    t_ours: list[float] = []
    t_ref: list[float] = []

    def step_ours() -> float:
        t0 = time.perf_counter()
        x = ours.ask()
        t1 = time.perf_counter()
        values = sphere(x)
        t2 = time.perf_counter()
        ours.tell(values)
        return (t1 - t0) + (time.perf_counter() - t2)

    def step_ref() -> float:
        t0 = time.perf_counter()
        xs = ref.ask()
        t1 = time.perf_counter()
        values = [float(x @ x) for x in xs]
        t2 = time.perf_counter()
        ref.tell(xs, values)
        return (t1 - t0) + (time.perf_counter() - t2)

    for g in range(warmup + generations):
        if g % 2:
            a, b = step_ours(), step_ref()
        else:
            b, a = step_ref(), step_ours()
        if g >= warmup:
            t_ours.append(a)
            t_ref.append(b)
    return t_ours, t_ref


def time_table(generations: int) -> tuple[list[dict[str, Any]], float]:
    rows = []
    for n in (100, 200, 1000):
        gens = generations if n < 1000 else max(40, generations // 2)
        ours, ref = time_generations(n, gens, warmup=5)
        rows.append(
            {
                "n": n,
                "popsize": default_popsize(n),
                "ours_median_ms": 1e3 * float(np.median(ours)),
                "pycma_median_ms": 1e3 * float(np.median(ref)),
                "ours_mean_ms": 1e3 * float(np.mean(ours)),
                "pycma_mean_ms": 1e3 * float(np.mean(ref)),
                "ratio": float(np.median(ours) / np.median(ref)),
                "mean_ratio": float(np.mean(ours) / np.mean(ref)),
            }
        )
    ratio = math.exp(float(np.mean([math.log(r["ratio"]) for r in rows])))
    return rows, ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds and fewer timed generations (< 60 s)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per problem (default 10, quick 2)")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 10)
    generations = 60 if args.quick else 200
    began = time.perf_counter()

    print(f"# engine benchmark ({'quick' if args.quick else 'full'}): {seeds} seeds, target f < {TARGET:g}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, cma {cma.__version__}, "
        f"{os.cpu_count()} cores, {platform.machine()}, "
        f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    )
    rows, evals_ratio = evals_table(seeds)
    print("\n| problem | N | ours median (ok) | pycma median (ok) | ours ERT | pycma ERT | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, p = r["ours"], r["pycma"]
        print(
            f"| {r['problem']} | {r['n']} | {o['median']:.0f} ({o['successes']}/{seeds}) | "
            f"{p['median']:.0f} ({p['successes']}/{seeds}) | {o['ert']:.0f} | {p['ert']:.0f} | "
            f"{r['ratio']:.3f} |"
        )
    times, time_ratio = time_table(generations)
    print(
        "\n| N | popsize | ours median ms | pycma median ms | ratio "
        "| ours mean ms | pycma mean ms | mean ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in times:
        print(
            f"| {t['n']} | {t['popsize']} | {t['ours_median_ms']:.3f} | {t['pycma_median_ms']:.3f} | "
            f"{t['ratio']:.3f} | {t['ours_mean_ms']:.3f} | {t['pycma_mean_ms']:.3f} | {t['mean_ratio']:.3f} |"
        )
    mean_time_ratio = math.exp(float(np.mean([math.log(t["mean_ratio"]) for t in times])))
    elapsed = time.perf_counter() - began
    print(f"\nelapsed {elapsed:.1f} s")
    sys.stdout.flush()
    print(
        json.dumps(
            {
                "evals_ratio_vs_pycma": round(evals_ratio, 4),
                "gen_time_ratio_vs_pycma": round(time_ratio, 4),
                "gen_time_mean_ratio_vs_pycma": round(mean_time_ratio, 4),
                "mode": "quick" if args.quick else "full",
                "seeds": seeds,
                "elapsed_s": round(elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
