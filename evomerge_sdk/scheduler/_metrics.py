"""Counters and latency percentiles of a scheduler, and the redaction applied to anything it logs."""

from __future__ import annotations

import re
from array import array

import attrs

from .._logs import mask_secrets

__all__ = ["Metrics", "MetricsSnapshot", "percentile", "redact"]

# Things that look like credentials: OpenAI/Anthropic-style keys, bearer tokens, key=value secrets.
_SECRET = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+[A-Za-z0-9._~+/\-]+=*|"
    r"(?i:api[_-]?key|x-api-key|authorization|token|secret)\s*[:=]\s*['\"]?[^\s'\",}]+)"
)


def redact(text: str, *, limit: int = 300) -> str:
    """`text` with every configured key and anything that looks like a credential replaced, then (never
    before: a cut through a key would leave its first part readable) truncated to `limit` characters."""
    text = _SECRET.sub("[REDACTED]", mask_secrets(text))
    return text if len(text) <= limit else text[:limit] + "..."


def percentile(values: array[float] | list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@attrs.frozen
class MetricsSnapshot:
    """A scheduler's counters at one moment. Latencies are seconds; None when nothing was measured.

    `latency_*` is one successful provider attempt; `total_latency_*` is a whole call as its caller saw
    it (budget and rate-limit waits, retries and backoff included). Cache and de-duplication hits are
    counted apart and not in the latencies.
    """

    calls: int
    requests: int
    succeeded: int
    failed: int
    retries: int
    rate_limited: int
    cache_hits: int
    dedup_hits: int
    budget_rejections: int
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    cost_usd: float
    in_flight: int
    latency_p50: float | None
    latency_p95: float | None
    total_latency_p50: float | None
    total_latency_p95: float | None
    reservation_overruns: int


@attrs.define(slots=True)
class Metrics:
    """Mutable counters updated on the event loop (no locks: one loop owns a scheduler)."""

    calls: int = 0  # calls to the scheduler, hits included
    requests: int = 0  # attempts sent to a provider
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    dedup_hits: int = 0
    budget_rejections: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int = 0
    cost_pico: int = 0
    in_flight: int = 0
    reservation_overruns: int = 0
    latencies: array[float] = attrs.field(factory=lambda: array("d"))
    total_latencies: array[float] = attrs.field(factory=lambda: array("d"))

    def snapshot(self) -> MetricsSnapshot:
        """Freeze the counters and compute the latency percentiles."""
        lat, tot = self.latencies, self.total_latencies
        return MetricsSnapshot(
            calls=self.calls,
            requests=self.requests,
            succeeded=self.succeeded,
            failed=self.failed,
            retries=self.retries,
            rate_limited=self.rate_limited,
            cache_hits=self.cache_hits,
            dedup_hits=self.dedup_hits,
            budget_rejections=self.budget_rejections,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            cached_tokens=self.cached_tokens,
            cost_usd=self.cost_pico / 10**12,
            in_flight=self.in_flight,
            latency_p50=percentile(lat, 0.5),
            latency_p95=percentile(lat, 0.95),
            total_latency_p50=percentile(tot, 0.5),
            total_latency_p95=percentile(tot, 0.95),
            reservation_overruns=self.reservation_overruns,
        )
