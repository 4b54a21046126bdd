"""A call that waited out the connection pool says why: the server refuses connections (and its reason), or
it accepts them and every pooled connection was taken."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
import pytest

from sonamu_tasks.backends.postgres import PostgresBackend
from sonamu_tasks.errors import BackendUnavailable
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.testing.postgres_cluster import free_port


async def test_a_server_that_refuses_connections_is_named_with_its_reason() -> None:
    backend = PostgresBackend(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", pool_timeout_s=0.5)
    await backend.open()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.get_run(new_run_id())
    finally:
        await backend.close()
    message = str(caught.value)
    assert "during get_run" in message
    assert "a new connection fails" in message
    assert "refused" in message.lower()  # the server's (here the OS's) own reason, not only "timed out"


async def test_a_pool_whose_connections_are_all_taken_says_so(postgres_url: str) -> None:
    backend = PostgresBackend(postgres_url, schema="pool_errors", pool_size=2, pool_timeout_s=0.5)
    await backend.open()
    try:
        await backend.migrate()
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):
                await held.enter_async_context(backend._connection())
            with pytest.raises(BackendUnavailable, match=r"all 2 of the pool's are in use \(1 calls waiting\)"):
                await backend.get_run(new_run_id())
        assert await backend.get_run(new_run_id()) is None  # given back, the connections serve again
    finally:
        await backend.close()


async def test_calls_timing_out_together_share_one_probe_of_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    probes = 0
    connect = psycopg.AsyncConnection.connect

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal probes
        if "connect_timeout" in kwargs:  # the probe's (the pool's own attempts pass none)
            probes += 1
        return await connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", counted)
    backend = PostgresBackend(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", pool_timeout_s=0.5)
    await backend.open()
    try:
        failures = await asyncio.gather(*(backend.get_run(new_run_id()) for _ in range(20)), return_exceptions=True)
    finally:
        await backend.close()
    assert all(isinstance(failure, BackendUnavailable) for failure in failures)
    assert all("a new connection fails" in str(failure) for failure in failures)
    assert probes == 1


def test_a_client_side_protocol_error_is_an_outage_not_a_refusal() -> None:
    """Behind PgBouncer, the server stopping made psycopg raise InternalError("received 2 results from command
    'BEGIN'") with no SQLSTATE: it was taken as PostgreSQL refusing the statement (logged at ERROR with a
    traceback on every heartbeat, and not retried), where it is the outage the next call gets through."""
    from sonamu_tasks.backends.postgres.backend import _is_transient

    assert _is_transient(psycopg.InternalError("received 2 results from command 'BEGIN'"))
    assert _is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert not _is_transient(ValueError("not a database error"))
