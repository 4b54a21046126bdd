"""Retry policies: how many attempts a run gets and how long it waits between them."""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import NonRetryableError
from .limits import MAX_DURATION


@dataclass(frozen=True)
class RetryDecision:
    """What a dynamic policy answers: retry or not, and after how long."""

    should_retry: bool
    delay_ms: float = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Static exponential backoff, or a dynamic `should_retry(error, attempt) -> RetryDecision`.

    `attempt` counts failed attempts, this one included (1 after the first failure). A run gets at most
    `max_attempts` attempts whatever `should_retry` answers. `jitter` (0 to 1) shortens each static delay by
    a random part of that fraction, so runs failing together (an outage) do not all retry at once.
    """

    max_attempts: int = 5
    initial_interval_ms: float = 1000
    backoff_coefficient: float = 2
    maximum_interval_ms: float | None = 60_000
    should_retry: Callable[[BaseException, int], RetryDecision] | None = None
    jitter: float = 0

    def __post_init__(self) -> None:
        # Checked here, not when a run first fails: a wrong policy is a definition error.
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        _check_number("initial_interval_ms", self.initial_interval_ms, at_least=0)
        _check_number("backoff_coefficient", self.backoff_coefficient, at_least=1)
        if self.maximum_interval_ms is not None:
            _check_number("maximum_interval_ms", self.maximum_interval_ms, at_least=0)
        _check_number("jitter", self.jitter, at_least=0)
        if self.jitter > 1:
            raise ValueError(f"RetryPolicy.jitter must be a fraction from 0 to 1, got {self.jitter}")
        if self.should_retry is not None and not callable(self.should_retry):
            raise TypeError(f"RetryPolicy.should_retry must be callable, got {type(self.should_retry).__name__}")
        if inspect.iscoroutinefunction(self.should_retry):
            # It is called where the failure is recorded, not awaited: its answer would be a coroutine.
            raise TypeError("RetryPolicy.should_retry must be a plain function, not an async one")

    def decide(self, error: BaseException, attempt: int) -> RetryDecision:
        if isinstance(error, NonRetryableError) or attempt >= self.max_attempts:
            return RetryDecision(should_retry=False)
        if self.should_retry is not None:
            decision = self.should_retry(error, attempt)
            if isinstance(decision, bool):  # a plain yes/no is the obvious thing to return: accept it
                return RetryDecision(decision, self._backoff(attempt))
            if not isinstance(decision, RetryDecision):
                raise TypeError(f"should_retry must return a RetryDecision, got {type(decision).__name__}")
            if not isinstance(decision.should_retry, bool):  # "no" is truthy: it must not retry by accident
                raise TypeError(f"RetryDecision.should_retry must be a bool, got {decision.should_retry!r}")
            if isinstance(decision.delay_ms, bool) or not isinstance(decision.delay_ms, int | float):
                raise TypeError(f"RetryDecision.delay_ms must be a number, got {decision.delay_ms!r}")
            return RetryDecision(decision.should_retry, _capped(decision.delay_ms))
        return RetryDecision(should_retry=True, delay_ms=self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        try:
            delay = float(self.initial_interval_ms) * float(self.backoff_coefficient) ** (attempt - 1)
        except OverflowError:  # a coefficient of 10 at attempt 400: longer than any cap
            delay = math.inf
        delay = delay if self.maximum_interval_ms is None else min(delay, self.maximum_interval_ms)
        if self.jitter and math.isfinite(delay):
            # Drawn below the cap, never above it: maximum_interval_ms stays the longest wait.
            delay *= 1 - self.jitter * random.random()
        return _capped(delay)


_LONGEST_DELAY_MS = MAX_DURATION.total_seconds() * 1000


def _capped(delay_ms: float) -> float:
    """A delay from 0 to the longest duration (100 years): a delay beyond could not be stored as a time,
    and NaN (from a dynamic policy) is no delay at all."""
    try:
        delay = float(delay_ms)
    except OverflowError:  # an int beyond float's range
        return _LONGEST_DELAY_MS
    return 0.0 if math.isnan(delay) or delay < 0 else min(delay, _LONGEST_DELAY_MS)


def _check_number(field: str, value: object, *, at_least: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"RetryPolicy.{field} must be a number, got {value!r}")
    if not math.isfinite(value) or value < at_least:
        raise ValueError(f"RetryPolicy.{field} must be a finite number >= {at_least:g}, got {value}")


DEFAULT_RETRY_POLICY = RetryPolicy()


def coerce_retry_policy(
    policy: RetryPolicy | Mapping[str, Any] | None, *, what: str, error: type[Exception]
) -> RetryPolicy | None:
    """A RetryPolicy, or the seed's plain-dict form (`{"max_attempts": 3, "initial_interval_ms": 500}`);
    anything else raises `error` naming `what`."""
    if policy is None or isinstance(policy, RetryPolicy):
        return policy
    if not isinstance(policy, Mapping):
        raise error(f"{what} must be a RetryPolicy or a dict of its fields, got {type(policy).__name__}")
    fields = {field.name for field in dataclasses.fields(RetryPolicy)}
    unknown = sorted(str(key) for key in policy if key not in fields)
    if unknown:
        raise error(
            f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(sorted(fields))}"
        )
    try:
        return RetryPolicy(**policy)
    except (TypeError, ValueError) as problem:
        raise error(f"{what}: {problem}") from problem
