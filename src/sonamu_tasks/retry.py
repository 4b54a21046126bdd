"""Retry policies: how many attempts a run gets and how long it waits between them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import NonRetryableError


@dataclass(frozen=True)
class RetryDecision:
    """What a dynamic policy answers: retry or not, and after how long."""

    should_retry: bool
    delay_ms: float = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Static exponential backoff, or a dynamic `should_retry(error, attempt) -> RetryDecision`.

    `attempt` counts failed attempts, this one included (1 after the first failure). A run gets at most
    `max_attempts` attempts whatever `should_retry` answers.
    """

    max_attempts: int = 5
    initial_interval_ms: float = 1000
    backoff_coefficient: float = 2
    maximum_interval_ms: float | None = 60_000
    should_retry: Callable[[BaseException, int], RetryDecision] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_interval_ms < 0:
            raise ValueError(f"RetryPolicy.initial_interval_ms must be >= 0, got {self.initial_interval_ms}")
        if self.backoff_coefficient < 1:
            raise ValueError(f"RetryPolicy.backoff_coefficient must be >= 1, got {self.backoff_coefficient}")
        if self.maximum_interval_ms is not None and self.maximum_interval_ms < 0:
            raise ValueError(f"RetryPolicy.maximum_interval_ms must be >= 0, got {self.maximum_interval_ms}")

    def decide(self, error: BaseException, attempt: int) -> RetryDecision:
        if isinstance(error, NonRetryableError) or attempt >= self.max_attempts:
            return RetryDecision(should_retry=False)
        if self.should_retry is not None:
            decision = self.should_retry(error, attempt)
            if isinstance(decision, bool):  # a plain yes/no is the obvious thing to return: accept it
                return RetryDecision(decision, self._backoff(attempt))
            if not isinstance(decision, RetryDecision):
                raise TypeError(f"should_retry must return a RetryDecision, got {type(decision).__name__}")
            return RetryDecision(decision.should_retry, max(0.0, float(decision.delay_ms)))
        return RetryDecision(should_retry=True, delay_ms=self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        delay = self.initial_interval_ms * self.backoff_coefficient ** (attempt - 1)
        return delay if self.maximum_interval_ms is None else min(delay, self.maximum_interval_ms)


DEFAULT_RETRY_POLICY = RetryPolicy()
