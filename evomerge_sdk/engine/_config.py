"""What a search runs: its stages (start, bounds, step size, budget, minibatch), held-out early stopping,
and the named presets: the paper's protocol, this SDK's default, LoRAHub-style, and the ablations of each.

Frozen attrs values, checked when built, so a bad setting fails before any query is paid for; derive
variants with `attrs.evolve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import attrs
from attrs.validators import and_, optional

from .._checks import is_int, is_number
from .._validators import Validator, must
from ..errors import ConfigError
from ._cmaes import default_popsize

__all__ = [
    "DEFAULT",
    "DIAGONAL_AUTO_MIN_MODELS",
    "LORAHUB",
    "PAPER",
    "PRESETS",
    "SIGMA_REFERENCE_MODELS",
    "EarlyStopping",
    "SearchConfig",
    "StageConfig",
    "ablations",
    "budget_too_small",
    "preset",
]

SIGMA_REFERENCE_MODELS = 20
"""With `sigma_scaling="sqrt"`, a stage's sigma holds for a pool of this many models (the paper's 20)."""
DIAGONAL_AUTO_MIN_MODELS = 40
"""With `diagonal="auto"`, pools of at least this many models use sep-CMA-ES: a full covariance matrix
needs O(N^2) evaluations to learn, far beyond a stage budget of a few hundred at this size."""


def budget_too_small(max_evaluations: int, popsize: int) -> str:
    """The message for a stage budget below one generation (checked here, and per pool by the search)."""
    return f"max_evaluations={max_evaluations} does not pay for one generation of {popsize} candidates"


def _stage(test: Callable[[Any], bool], message: str) -> Validator:
    """A stage field's check: its message starts as every stage config error does."""
    return must(test, "stage config: " + message)


_finite = _stage(is_number, "{name} must be a finite number, got {value!r}")
_at_least_zero = and_(_finite, _stage(lambda v: v >= 0, "penalty, tolfun and tolx must be >= 0"))


@attrs.frozen
class StageConfig:
    """One CMA-ES stage: where it starts, how wide it samples, its box, population and budget.

    `start="1/N"` starts every entry at 1/N. `max_evaluations` is never exceeded by the generations: the
    stage stops when the next full generation would not fit. `diagonal="auto"` uses sep-CMA-ES for large
    pools. `sigma_scaling="sqrt"` divides sigma by sqrt(N / 20), so one preset fits every pool size (a
    merge's effect grows with the number of models it sums; 20 is the paper's pool).

    `batch_size` turns on minibatch fitness: each generation scores all its candidates on the same
    `batch_size` examples (common random numbers: the ranking CMA needs survives the noise), a fresh draw
    per generation. A minibatch loss is biased for the candidate that won on it, so such a stage never
    takes a generation's winner as its incumbent: it scores the CMA mean on the whole split every
    `rescore_every` generations (0: only when the stage ends), one evaluation more each time, and keeps
    it if its fitness beats the incumbent's.
    """

    start: float | Literal["1/N"] = attrs.field(
        validator=_stage(
            lambda v: v == "1/N" or is_number(v), "start must be a finite number or '1/N', got {value!r}"
        )
    )
    sigma: float = attrs.field(
        validator=and_(_finite, _stage(lambda v: v > 0, "sigma must be > 0, got {value}"))
    )
    lower: float = attrs.field(validator=_finite)
    upper: float = attrs.field(validator=_finite)
    max_evaluations: int = attrs.field(
        validator=_stage(
            lambda v: is_int(v) and v >= 1, "max_evaluations must be an integer >= 1, got {value!r}"
        )
    )
    popsize: int | None = attrs.field(
        default=20,
        validator=_stage(
            lambda v: v is None or (is_int(v) and v >= 2),
            "popsize must be None (default) or an integer >= 2, got {value!r}",
        ),
    )
    penalty: float = attrs.field(default=0.05, validator=_at_least_zero)
    diagonal: bool | Literal["auto"] = attrs.field(
        default=False,
        validator=_stage(
            lambda v: v in (True, False, "auto"), "diagonal must be True, False or 'auto', got {value!r}"
        ),
    )
    tolfun: float = attrs.field(default=1e-11, validator=_at_least_zero)
    tolx: float = attrs.field(default=1e-11, validator=_at_least_zero)
    sigma_scaling: Literal["none", "sqrt"] = attrs.field(
        default="none",
        validator=_stage(
            lambda v: v in ("none", "sqrt"), "sigma_scaling must be 'none' or 'sqrt', got {value!r}"
        ),
    )
    batch_size: int | None = attrs.field(
        default=None,
        validator=_stage(
            lambda v: v is None or (is_int(v) and v >= 1),
            "batch_size must be None (whole split) or an integer >= 1, got {value!r}",
        ),
    )
    rescore_every: int = attrs.field(
        default=0,
        validator=_stage(
            lambda v: is_int(v) and v >= 0, "rescore_every must be an integer >= 0, got {value!r}"
        ),
    )

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants: the box, the start within it, and a budget for one generation."""

        def fail(msg: str) -> ConfigError:
            return ConfigError(f"stage config: {msg}")

        if not self.lower < self.upper:
            raise fail(f"bounds need lower < upper, got [{self.lower}, {self.upper}]")
        if self.start != "1/N" and not self.lower <= self.start <= self.upper:
            raise fail(f"start {self.start} lies outside [{self.lower}, {self.upper}]")
        if self.popsize is not None and self.max_evaluations < self.popsize:
            raise fail(budget_too_small(self.max_evaluations, self.popsize))

    def sigma_value(self, n: int) -> float:
        """The initial step size for a pool of n models."""
        return (
            self.sigma / math.sqrt(n / SIGMA_REFERENCE_MODELS) if self.sigma_scaling == "sqrt" else self.sigma
        )

    def start_value(self, n: int) -> float:
        """The start for a pool of n models; 1/N must lie within the bounds."""
        value = 1.0 / n if self.start == "1/N" else float(self.start)
        if not self.lower <= value <= self.upper:
            raise ConfigError(f"start {value} lies outside the stage bounds [{self.lower}, {self.upper}]")
        return value

    def popsize_value(self, n: int) -> int:
        """Candidates per generation for a pool of n models (CMA-ES's default when `popsize` is None)."""
        return self.popsize if self.popsize is not None else default_popsize(n)

    def use_diagonal(self, n: int) -> bool:
        """Whether this stage runs sep-CMA-ES for n models."""
        return n >= DIAGONAL_AUTO_MIN_MODELS if self.diagonal == "auto" else bool(self.diagonal)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        """The inverse of `to_dict`."""
        try:
            return cls(**data)
        except TypeError as exc:  # an unknown or missing field
            raise ConfigError(f"stage config: {exc}") from None


@attrs.frozen
class EarlyStopping:
    """Stop a stage when the incumbent's held-out loss has not improved by `min_delta` for `patience`
    generations. The held-out split is scored once per new incumbent, so it costs one evaluation at most
    per generation."""

    patience: int = attrs.field(
        default=5,
        validator=must(
            lambda v: is_int(v) and v >= 1, "early stopping patience must be an integer >= 1, got {value!r}"
        ),
    )
    min_delta: float = attrs.field(
        default=0.0,
        validator=must(
            lambda v: is_number(v) and v >= 0, "early stopping min_delta must be >= 0, got {value!r}"
        ),
    )


@attrs.frozen
class Stage:
    """One stage of a search, in run order: its name (what progress, history and checkpoints call it),
    the vector it searches (the other one stays fixed while it runs), and its settings."""

    name: str
    searches: Literal["alpha", "beta"]
    config: StageConfig


_optional_stage = optional(
    must(
        lambda v: isinstance(v, StageConfig),
        "{name} must be a StageConfig or None, got {value.__class__.__name__}",
    )
)


@attrs.frozen
class SearchConfig:
    """A complete search: stage 1 (`denoise`, over alpha) and/or stage 2 (`scale`, over beta).

    Without `denoise`, alpha is `fixed_alpha` for every model; without `scale`, beta is 1/N. Presets are
    values of this class: derive variants with `attrs.evolve(PAPER, seed=3)`.
    """

    name: str = attrs.field(
        validator=must(
            lambda v: isinstance(v, str) and bool(v),
            "a search config's name must be a non-empty string, got {value!r}",
        )
    )
    denoise: StageConfig | None = attrs.field(validator=_optional_stage)
    scale: StageConfig | None = attrs.field(validator=_optional_stage)
    early_stopping: EarlyStopping | None = attrs.field(
        default=None,
        validator=optional(
            must(
                lambda v: isinstance(v, EarlyStopping),
                "early_stopping must be an EarlyStopping or None, got {value!r}",
            )
        ),
    )
    fixed_alpha: float = attrs.field(
        default=1.0,
        validator=must(
            lambda v: is_number(v) and 0 <= v <= 1, "fixed_alpha must be in [0, 1], got {value!r}"
        ),
    )
    seed: int = attrs.field(
        default=0,
        validator=must(lambda v: is_int(v) and v >= 0, "seed must be a non-negative integer, got {value!r}"),
    )

    def __attrs_post_init__(self) -> None:
        """Cross-field invariants: at least one stage; early stopping that a minibatch stage can feed."""
        if self.denoise is None and self.scale is None:
            raise ConfigError("a search needs at least one stage (denoise or scale)")
        stop = self.early_stopping
        for stage in self.stages():
            # A minibatch stage's incumbent only changes when it re-scores its mean.
            settings = stage.config
            if (
                stop is not None
                and settings.batch_size is not None
                and not 1 <= settings.rescore_every <= stop.patience
            ):
                raise ConfigError(
                    f"stage {stage.name!r}: early stopping on a minibatch stage needs rescore_every in "
                    f"[1, patience={stop.patience}], got {settings.rescore_every}"
                )

    def stages(self) -> list[Stage]:
        """The active stages in run order."""
        out = []
        if self.denoise is not None:
            out.append(Stage("denoise", "alpha", self.denoise))
        if self.scale is not None:
            out.append(Stage("scale", "beta", self.scale))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        """The inverse of `to_dict`."""
        if not isinstance(data.get("name"), str):
            raise ConfigError("a search config needs a name (a string)")
        stop = data.get("early_stopping")
        return cls(
            name=data["name"],
            denoise=None if data.get("denoise") is None else StageConfig.from_dict(data["denoise"]),
            scale=None if data.get("scale") is None else StageConfig.from_dict(data["scale"]),
            early_stopping=None if stop is None else EarlyStopping(**stop),
            fixed_alpha=data.get("fixed_alpha", 1.0),
            seed=data.get("seed", 0),
        )


PAPER = SearchConfig(
    name="paper",
    denoise=StageConfig(
        start=1.0, sigma=0.05, lower=0.0, upper=1.0, popsize=20, max_evaluations=400, penalty=0.05
    ),
    scale=StageConfig(
        start="1/N", sigma=0.05, lower=-1.5, upper=1.5, popsize=20, max_evaluations=800, penalty=0.05
    ),
    early_stopping=EarlyStopping(patience=5),
)
"""The authors' protocol exactly as DESIGN 1.1 lists it. The paper gives no patience for its held-out
early stopping; 5 generations is this SDK's reading. Drop it with `attrs.evolve(PAPER, early_stopping=None)`
when the objective has no held-out split."""

_SCALE = StageConfig(
    start="1/N",
    sigma=0.07,
    sigma_scaling="sqrt",
    lower=-1.5,
    upper=1.5,
    popsize=20,
    max_evaluations=900,
    penalty=0.05,
    diagonal="auto",
    batch_size=20,
    rescore_every=10,
)

TWO_STAGE = SearchConfig(
    name="two-stage",
    denoise=StageConfig(
        start=1.0,
        sigma=0.2,
        lower=0.0,
        upper=1.0,
        popsize=20,
        max_evaluations=80,
        penalty=0.05,
        diagonal="auto",
        batch_size=20,
        rescore_every=10,
    ),
    scale=attrs.evolve(_SCALE, max_evaluations=820),
)
"""The paper's two stages at the default's spend: stage 1 (denoising, alpha with beta = 1/N) gets 80 of
the 900 minibatch evaluations, stage 2 the rest. Kept to measure what denoising buys: over cases it buys
nothing here (`benchmarks/quality.py`, `evo_minus_no_denoising`), so `DEFAULT` has no stage 1."""

DEFAULT = SearchConfig(name="default", denoise=None, scale=_SCALE)
"""This SDK's search: the paper's scaling stage (beta, signed, alpha = 1) for under a tenth of the paper
protocol's queries, at a lower validation loss (`benchmarks/cost.py`). Every generation scores its 20
candidates on one fresh minibatch of 20 of the 300 examples (common random numbers keep the ranking CMA
needs), so 900 evaluations cost 18,000 example queries; every 10th generation and at the end the CMA mean is
scored on the whole split and the best such merge is kept (5 times 300 more), since a minibatch winner's
loss is biased. The paper protocol spends 360,000 (about 215,000 when its held-out early stopping fires).
The step size shrinks as 1/sqrt(N) (a merge's effect grows with the number of models it sums: 0.07 at 20
models, 0.031 at 100), with sep-CMA-ES from 40 models on. No stage 1: measured over cases, in worlds whose
adapters share one A initialisation and in worlds where each has its own, no denoising variant paid
(`TWO_STAGE` keeps the paper's). No held-out early stopping: on 100 examples it stopped searches early at a
clear loss in quality for few queries saved (see the cost notes)."""

LORAHUB = SearchConfig(
    name="lorahub",
    denoise=None,
    scale=StageConfig(
        start=0.0, sigma=0.1, lower=-1.5, upper=1.5, popsize=20, max_evaluations=800, penalty=0.05
    ),
    fixed_alpha=1.0,
)
"""LoRAHub-style: one stage, no sparsification, weights in [-1.5, 1.5] from 0, fitness loss +
0.05 mean(|w|). LoRAHub itself runs nevergrad's NGOpt (Cobyla at its 20-model, 40-evaluation setting);
this preset runs this engine's CMA-ES instead, so every search row of a comparison shares one optimiser."""


def ablations(base: SearchConfig, *, keep_budget: bool = False) -> dict[str, SearchConfig]:
    """The paper's ablations of `base`: no denoising (stage 2 only), no scaling (stage 1 only, beta 1/N),
    no negative betas (stage 2 bounds [0, upper]).

    With `keep_budget`, the stage that is kept also gets the dropped stage's evaluations, so an ablation
    spends what the full method spends (for comparisons at equal cost); otherwise it drops them too.
    """
    if not isinstance(base, SearchConfig):
        raise ConfigError(f"ablations need a SearchConfig (see preset), got {base!r:.60}")
    if base.denoise is None or base.scale is None:
        raise ConfigError("ablations need a base config with both stages")
    total = base.denoise.max_evaluations + base.scale.max_evaluations
    scale_only = attrs.evolve(base.scale, max_evaluations=total) if keep_budget else base.scale
    denoise_only = attrs.evolve(base.denoise, max_evaluations=total) if keep_budget else base.denoise
    return {
        "no_denoising": attrs.evolve(base, name=f"{base.name}/no_denoising", denoise=None, scale=scale_only),
        "no_scaling": attrs.evolve(base, name=f"{base.name}/no_scaling", denoise=denoise_only, scale=None),
        "no_negative_betas": attrs.evolve(
            base, name=f"{base.name}/no_negative_betas", scale=attrs.evolve(base.scale, lower=0.0)
        ),
    }


PRESETS: dict[str, SearchConfig] = {
    "paper": PAPER,
    "default": DEFAULT,
    "lorahub": LORAHUB,
    "two-stage": TWO_STAGE,
    **{f"paper/{k}": v for k, v in ablations(PAPER).items()},
    **{f"two-stage/{k}": v for k, v in ablations(TWO_STAGE, keep_budget=True).items()},
    # The default has no stage 1: its "no denoising" is itself (the name kept for existing callers).
    "default/no_denoising": attrs.evolve(DEFAULT, name="default/no_denoising"),
    "default/no_negative_betas": attrs.evolve(
        DEFAULT, name="default/no_negative_betas", scale=attrs.evolve(_SCALE, lower=0.0)
    ),
}


def preset(name: str) -> SearchConfig:
    """A preset by name: 'paper', 'default', 'lorahub', 'two-stage', 'paper/no_denoising',
    'two-stage/no_scaling', 'default/no_negative_betas', ...

    The paper's ablations drop a stage with its budget, as the paper's did; the two-stage search's keep the
    full budget (the dropped stage's evaluations go to the kept one), so they compare at equal cost."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def known_preset(_: object, __: attrs.Attribute[Any], name: str) -> None:
    """An attrs validator for settings that name a preset, so a typo fails when they are built."""
    preset(name)
