"""Backoff for step retries: exponential, capped, with full jitter (random injected)."""

from __future__ import annotations

import random

from ..config import RetryConfig


def backoff_s(policy: RetryConfig, attempt: int, rng: random.Random,
              retry_after_s: float | None = None) -> float:
    """Delay before attempt ``attempt + 1`` after attempt ``attempt`` failed.

    Full jitter: uniform in [0, min(max_backoff_s, backoff_s * 2**(attempt-1))].
    A service's Retry-After is honoured: the delay is never shorter than it (up to
    ``max_retry_after_s``, so a server cannot park a step for an hour). Pass the
    policy of the error's class (``RetryConfig.for_class``).

    Examples:
        >>> from threadbound.runtime.config import RetryConfig
        >>> backoff_s(RetryConfig(backoff_s=1, jitter=False), 3, random.Random(0))
        4.0
    """
    ceiling = min(policy.max_backoff_s, policy.backoff_s * (2 ** max(0, attempt - 1)))
    delay = rng.uniform(0.0, ceiling) if policy.jitter else ceiling
    if retry_after_s is not None:
        delay = max(delay, min(float(retry_after_s), policy.max_retry_after_s))
    return delay
