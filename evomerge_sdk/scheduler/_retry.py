"""Which failures to retry, and how long to wait before the next attempt.

Only `RetryableError`s are retried (rate limits, 5xx, timeouts, dropped connections, malformed answers);
authentication and invalid-request errors are final. The wait is exponential backoff with full jitter
(uniform in [0, min(max_delay, base_delay * 2**(attempt-1))]), unless the API said how long to wait
(`Retry-After` / `retry-after-ms`, carried as `retry_after` seconds): that is honoured as given, up to
`max_retry_after`; a longer demand fails the request with the API's error instead of stalling the run.
"""

from __future__ import annotations

import math
import random

import attrs

from .._validators import number
from ..errors import RetryableError

__all__ = ["RetryPolicy"]

_SECONDS = number(strict=False, unit="seconds", prefix="RetryPolicy.")


@attrs.frozen
class RetryPolicy:
    """Retry settings. `max_attempts` counts the first try; `seed` makes the jitter reproducible."""

    max_attempts: int = attrs.field(default=6, validator=number(integer=True, prefix="RetryPolicy."))
    base_delay: float = attrs.field(default=0.25, validator=_SECONDS)
    max_delay: float = attrs.field(default=20.0, validator=_SECONDS)
    max_retry_after: float = attrs.field(default=60.0, validator=_SECONDS)
    seed: int = 0

    def rng(self) -> random.Random:
        """A jitter source seeded from `seed`."""
        return random.Random(self.seed)

    def delay(self, exc: BaseException, attempt: int, rng: random.Random) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when `exc` must not be retried."""
        if not isinstance(exc, RetryableError) or attempt >= self.max_attempts:
            return None
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, (int, float)) and math.isfinite(hint) and hint >= 0:
            return float(hint) if hint <= self.max_retry_after else None
        cap = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return rng.uniform(0.0, cap)
