"""psycopg adapters of our own: timestamptz values read back clamped instead of failing, and durations sent as
elapsed time.

PostgreSQL stores times up to the year 294276, and `infinity`; a Python datetime ends at 9999. psycopg
raises DataError ("timestamp too large") for a value beyond, and that one row then fails every query
that reads it: every listing, for every user, even after its run is canceled. `run()` and `step.sleep`
now refuse such times (see `limits`), but a database may already hold one, so reading clamps: a time
outside `limits.READABLE_TIMES` reads as the nearest end, as the SQLite backend does.

The loaders wrap psycopg's own (the C ones with psycopg[binary]), so a normal time costs one Python call
more and nothing else.

A duration (a timedelta: a delayed start, a deadline, a sleep, a lease) goes as an interval of microseconds
alone. psycopg's own dumper sends its whole days as interval days, which PostgreSQL adds to a time as calendar
days in the session's time zone: on a server whose TimeZone keeps daylight saving, a run delayed by 100 days
across the change started an hour early or late, where the engine promises elapsed time (and run_many's
statements, which send seconds, already kept it).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg
from psycopg import abc
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import AdaptersMap, Dumper, Loader
from psycopg.pq import Format

from ...limits import READABLE_TIMES

_EARLIEST, _LATEST = READABLE_TIMES


def register_adapters(adapters: AdaptersMap) -> None:
    """Make `adapters` (a connection's, usually) read timestamptz values clamped and send durations as elapsed
    time."""
    for loader in _LOADERS:
        adapters.register_loader("timestamptz", loader)
    for dumper in _DUMPERS:
        adapters.register_dumper(timedelta, dumper)


def _psycopg_loader(format: Format) -> type[abc.Loader]:
    """psycopg's own timestamptz loader (before ours: these are read from the global map, never changed)."""
    loader = psycopg.adapters.get_loader(psycopg.adapters.types["timestamptz"].oid, format)
    if loader is None:  # pragma: no cover - psycopg always has one
        raise RuntimeError("psycopg has no timestamptz loader")
    return loader


class _ClampedTimestamptzLoader(Loader):
    """psycopg's timestamptz loader, with out-of-range values clamped instead of raised."""

    wrapped: type[abc.Loader]

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._wrapped = self.wrapped(oid, context)

    def load(self, data: Buffer) -> datetime:
        try:
            moment: datetime = self._wrapped.load(data)
        except psycopg.DataError:  # before the year 1 or after 9999 (infinity included)
            return _EARLIEST if self._before_year_one(bytes(data)) else _LATEST
        return _EARLIEST if moment < _EARLIEST else _LATEST if moment > _LATEST else moment

    @staticmethod
    def _before_year_one(data: bytes) -> bool:
        raise NotImplementedError


class _ClampedTimestamptzTextLoader(_ClampedTimestamptzLoader):
    format = Format.TEXT
    wrapped = _psycopg_loader(Format.TEXT)

    @staticmethod
    def _before_year_one(data: bytes) -> bool:
        return data.startswith(b"-") or data.rstrip().endswith(b"BC")  # -infinity, or "... BC"


class _ClampedTimestamptzBinaryLoader(_ClampedTimestamptzLoader):
    format = Format.BINARY
    wrapped = _psycopg_loader(Format.BINARY)

    @staticmethod
    def _before_year_one(data: bytes) -> bool:
        return int.from_bytes(data[:8], "big", signed=True) < 0  # microseconds from 2000-01-01


_LOADERS = (_ClampedTimestamptzTextLoader, _ClampedTimestamptzBinaryLoader)


def _microseconds(duration: timedelta) -> int:
    return duration // timedelta(microseconds=1)  # exact: timedelta counts whole microseconds


class _ElapsedIntervalTextDumper(Dumper):
    """A timedelta as an interval of microseconds alone (no days: see the module's docstring)."""

    oid = psycopg.adapters.types["interval"].oid
    format = Format.TEXT

    def dump(self, obj: timedelta) -> bytes:
        return f"{_microseconds(obj)} microseconds".encode()


class _ElapsedIntervalBinaryDumper(Dumper):
    """The same in the binary form: microseconds, days (0), months (0)."""

    oid = psycopg.adapters.types["interval"].oid
    format = Format.BINARY

    def dump(self, obj: timedelta) -> bytes:
        return _microseconds(obj).to_bytes(8, "big", signed=True) + bytes(8)


_DUMPERS = (_ElapsedIntervalTextDumper, _ElapsedIntervalBinaryDumper)
