"""Time-ordered run ids (UUIDv7, RFC 9562): newest-first listing and index locality come for free.

The ids one process makes sort in the order it made them, also within one millisecond (a batch of
run_many, run() calls in a row): the claim breaks ties between runs due at the same moment by id, so this
order is the FIFO order of runs created together."""

from __future__ import annotations

import os
import re
import threading
import time
from bisect import bisect_left
from datetime import UTC, datetime, timedelta
from itertools import accumulate

from .errors import RunNotFound

RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
"""A run id as given: a UUID in the 8-4-4-4-12 form, in either case."""

_LOW = 1 << 48  # the last 12 hex digits of an id; a counter's higher bits go in the two groups before them
_COUNTER_BITS = 74  # rand_a (12 bits) and rand_b (62 bits)
_ODD = bytes(byte | 1 for byte in range(256))  # random bytes made odd: an increment is never 0


class _Clock:
    """The last id made in this process: its millisecond and its 74 counter bits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.millis = -1
        self.counter = 0


_clock = _Clock()


def _forget_clock() -> None:
    """In a forked child: count from a fresh random point, not on from the parent's last id (which the parent
    goes on from too), and with a lock no other thread of the parent may have held at the fork."""
    global _clock
    _clock = _Clock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clock)


def new_run_id() -> str:
    return new_run_ids(1)[0]


def new_run_ids(count: int) -> list[str]:
    """`count` new ids, each greater than the one before, from one read of the clock (10,000 take about
    3 ms). Each has the 48-bit millisecond prefix, version 7, the RFC 4122 variant and 74 bits that count
    (RFC 9562 6.2, "monotonic random"): a new millisecond starts them at a random point in the lower half
    of their range, and each id adds a random increment (1 to 2^32) to the one before, so ids of other
    processes are as unlikely to meet them as random ones and one id does not give away its siblings. In
    the millisecond of the last id (or an earlier one: the clock was set back) the count goes on in the last
    id's millisecond; a count that would run out (after 2^41 ids or more) moves on to the next millisecond.
    Written straight in the canonical 8-4-4-4-12 form."""
    if count <= 0:
        return []
    randomness = os.urandom(10 + 4 * count)  # one read: a fresh start, then the increments
    steps = memoryview(randomness[10:].translate(_ODD)).cast("I")
    clock = _clock
    with clock.lock:
        millis = time.time_ns() // 1_000_000
        if millis > clock.millis:
            counter = _fresh_counter(randomness[:10])
        else:
            millis, counter = clock.millis, clock.counter
        while True:
            high, low = divmod(counter, _LOW)
            lows = list(accumulate(steps, initial=low))
            last = high * _LOW + lows[-1]
            if last < 1 << _COUNTER_BITS:
                break
            millis, counter = millis + 1, _fresh_counter(os.urandom(10))
        clock.millis, clock.counter = millis, last
    del lows[0]  # the previous id's
    millis &= 0xFFFF_FFFF_FFFF
    ids: list[str] = []
    start = 0
    while start < count:  # the ids whose two groups before the last are the same, formatted together
        carry = lows[start] // _LOW
        end = bisect_left(lows, (carry + 1) * _LOW, start)
        upper = high + carry  # rand_a and the 14 high bits of rand_b
        form = f"{millis >> 16:08x}-{millis & 0xFFFF:04x}-7{upper >> 14:03x}-{0x8000 | upper & 0x3FFF:04x}-%012x"
        part = lows[start:end] if not carry else [low - carry * _LOW for low in lows[start:end]]
        ids += map(form.__mod__, part)
        start = end
    return ids


def _fresh_counter(random_bytes: bytes) -> int:
    """A millisecond's first counter: 73 random bits, so the upper half of the range is left to count in."""
    return int.from_bytes(random_bytes) >> (8 * len(random_bytes) - _COUNTER_BITS + 1)


def first_id_at(moment: datetime) -> str:
    """The smallest id a run made at `moment` or later can have: its millisecond, every other bit 0 (canonical
    lowercase text, so it sorts as the UUID does both as text and as a uuid)."""
    millis = max(0, min((moment - _EPOCH) // timedelta(milliseconds=1), 0xFFFF_FFFF_FFFF))
    return f"{millis >> 16:08x}-{millis & 0xFFFF:04x}-0000-0000-000000000000"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_run_id(value: object) -> str | None:
    """`value` as run ids are stored (lowercase), or None when it cannot be a run id: PostgreSQL would refuse
    it as a uuid where SQLite finds no row, and finds "ABC..." where SQLite looks for "abc..."."""
    return value.lower() if isinstance(value, str) and RUN_ID.fullmatch(value) else None


def stored_run_id(run_id: object) -> str:
    """`run_id` as runs are stored, RunNotFound for what cannot be a run id."""
    canonical = canonical_run_id(run_id)
    if canonical is None:
        raise RunNotFound(f"no run with id {run_id!r} (run ids are UUIDs)")
    return canonical
