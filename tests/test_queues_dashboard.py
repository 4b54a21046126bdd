"""The dashboard's Queues page (/queues, /api/queues) and a run's queue on its page, against a real database
(both backends), driven in-process (httpx over ASGI) behind every guard of the other pages."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from html import unescape
from typing import Any

import httpx
import pytest

from sonamu_tasks import Queue, WorkflowManager, workflow
from sonamu_tasks.backends.postgres.queries import QUERIES
from sonamu_tasks.dashboard import Dashboard

from .conftest import wait_until

BASE = "http://127.0.0.1:8765"
HOSTILE = "<script>alert(1)</script>"


@asynccontextmanager
async def dashboard(make_config: Any, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its manager started, and a client that talks to it in-process as 127.0.0.1:8765."""
    app = Dashboard(make_config(enable_worker=False), **options)
    await app.manager.start()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield client
    finally:
        await app.manager.stop()


@pytest.fixture
def open_dashboard(make_config: Any) -> Callable[..., Any]:
    return lambda **options: dashboard(make_config, **options)


def cells(page: str, queue: str) -> list[str]:
    """The text of each cell of `queue`'s row on the Queues page."""
    match = re.search(rf"<tr data-queue='{re.escape(queue)}'>(.*?)</tr>", page)
    assert match is not None, f"no row for queue {queue!r}"
    return [unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", match.group(1))]


async def test_the_queues_page_shows_limits_running_backlog_rate_window_and_parked_runs(
    manager_for: Any, open_dashboard: Any
) -> None:
    # given a limited queue with two runs executing, one parked behind its key and two more due
    gate = asyncio.Event()

    async def held(value: str) -> str:
        await gate.wait()
        return value

    @workflow(version="1", queue=Queue("payments", concurrency=2, rate_limit="100/1s", per_key_concurrency=1))
    async def charge(input: str, step: Any) -> str:
        return str(await step.define("charge", held).run(input))

    manager = await manager_for([charge], concurrency=4)
    handles = [await manager.run(charge, key, concurrency_key=key) for key in ("a", "a", "b", "c", "d")]
    await wait_until(lambda: _payments_are(manager, running=2, due=3, parked=1), what="two running, one parked")
    try:
        async with open_dashboard() as client:
            # when the Queues page and its JSON are asked for
            page = await client.get("/queues")
            api = await client.get("/api/queues")
            partial = await client.get("/queues", headers={"X-Partial": "1"})
    finally:
        gate.set()
    for handle in handles:
        await handle.result(timeout=30)

    # then the page has the same columns as `sonamu-tasks queues`, and the queue's numbers
    assert page.status_code == 200, page.text
    head = re.findall(r"<th>(.*?)</th>", page.text)
    assert head == [
        "queue",
        "concurrency",
        "per worker",
        "rate limit",
        "per key",
        "running",
        "due",
        "oldest due",
        "rate window",
        "parked on key",
        "workers",
    ]
    row = cells(page.text, "payments")
    age = row.pop(7)
    assert re.fullmatch(r"\d+(ms|s|m)", age), age
    # The window is a second: the starts in it are the two of the last second, or none.
    window = row.pop(7)
    assert window in ("0/100", "1/100", "2/100"), window
    assert row == ["payments", "2", "-", "100/1s", "1", "2", "3", "1", "1"]
    assert cells(page.text, "default") == ["default", "-", "-", "-", "-", "0", "0", "-", "-", "0", "0"]
    assert "data-refresh-ms='2000'" in page.text
    assert "id='unserved'" not in page.text  # the worker claims from payments: no warning
    assert "<table id='queues'>" in partial.text and "<html" not in partial.text

    # and the JSON says the same, as `sonamu-tasks queues --json`
    assert api.status_code == 200 and api.headers["content-type"] == "application/json"
    listed = {queue["name"]: queue for queue in api.json()}
    payments = listed["payments"]
    assert payments["rate_limit"] == "100/1s" and payments["rate_limit_window_s"] == 1.0
    assert (payments["running"], payments["due"], payments["parked_on_key"], payments["workers"]) == (2, 3, 1, 1)
    assert payments["concurrency"] == 2 and payments["per_key_concurrency"] == 1
    assert payments["worker_concurrency"] is None and 0 <= payments["oldest_due_s"] < 60


async def _payments_are(manager: WorkflowManager, *, running: int, due: int, parked: int) -> bool:
    stats = {s.name: s for s in await manager.queue_stats()}
    found = stats.get("payments")
    return found is not None and (found.running, found.due, found.parked_on_key) == (running, due, parked)


async def test_every_page_links_the_queues_page(manager_for: Any, open_dashboard: Any) -> None:
    @workflow(version="1")
    async def plain(input: Any) -> Any:
        return input

    manager = await manager_for([plain], enable_worker=False)
    later = await manager.run(plain, 1, start_at="1h")
    async with open_dashboard() as client:
        for path in ("/", "/queues", "/workers", "/schedules", f"/runs/{later.id}"):
            page = await client.get(path)
            assert page.status_code == 200 and "<a href='/queues'>Queues</a>" in page.text, path


async def test_a_run_page_shows_its_queue_priority_and_concurrency_key(manager_for: Any, open_dashboard: Any) -> None:
    @workflow(version="1", queue=Queue("payments", concurrency=5))
    async def pay(input: Any) -> Any:
        return input

    @workflow(version="1")
    async def plain(input: Any) -> Any:
        return input

    manager = await manager_for([pay, plain], enable_worker=False)
    queued = await manager.run(pay, 1, start_at="1h", priority=5, concurrency_key="customer-7")
    other = await manager.run(plain, 2, start_at="1h")
    async with open_dashboard() as client:
        page = (await client.get(f"/runs/{queued.id}")).text
        plain_page = (await client.get(f"/runs/{other.id}")).text
        detail = (await client.get(f"/api/runs/{queued.id}")).json()
    assert (
        "<p id='run-queue'>queue <a href='/queues'>payments</a> · priority <code>5</code> · "
        "concurrency key <code>customer-7</code></p>"
    ) in page
    assert "id='run-queue'" not in plain_page  # the default queue, no priority, no key: nothing to say
    assert (detail["queue"], detail["priority"], detail["concurrency_key"]) == ("payments", 5, "customer-7")


async def test_queue_names_and_keys_are_escaped(manager_for: Any, open_dashboard: Any) -> None:
    @workflow(version="1")
    async def plain(input: Any) -> Any:
        return input

    manager = await manager_for([plain], enable_worker=False)
    hostile = await manager.run(plain, 1, queue=HOSTILE, concurrency_key=HOSTILE)
    async with open_dashboard() as client:
        queues = (await client.get("/queues")).text
        run_page = (await client.get(f"/runs/{hostile.id}")).text
        api = (await client.get("/api/queues")).json()
    for page in (queues, run_page):
        assert HOSTILE not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert cells(queues, "&lt;script&gt;alert(1)&lt;/script&gt;")[0] == HOSTILE
    assert HOSTILE in {queue["name"] for queue in api}


async def test_the_queues_pages_are_behind_the_host_check_and_the_token(open_dashboard: Any) -> None:
    async with open_dashboard(token="s3cret") as client:
        bearer = {"Authorization": "Bearer s3cret"}
        for path in ("/queues", "/api/queues"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401, path
            foreign = await client.get(path, headers={**bearer, "Host": "attacker.example:8765"})
            assert foreign.status_code == 400, path
            allowed = await client.get(path, headers=bearer)
            assert allowed.status_code == 200, path
            assert allowed.headers.get("x-frame-options") == "DENY", path
            assert "default-src 'self'" in allowed.headers.get("content-security-policy", ""), path
            assert (await client.post(path, headers={**bearer, "Origin": BASE})).status_code == 405, path


async def test_the_queues_page_warns_of_a_queue_with_runs_due_that_no_worker_claims_from(
    manager_for: Any, open_dashboard: Any
) -> None:
    @workflow(version="1", queue=Queue("orphaned"))
    async def orphan(input: Any) -> Any:
        return input

    producer = await manager_for([orphan], enable_worker=False)
    await producer.run(orphan, 1)
    async with open_dashboard() as client:
        page = (await client.get("/queues")).text
    assert "<div id='unserved' class='warning'><p>queue orphaned: 1 run due and no live worker claims from it" in page
    assert cells(page, "orphaned")[-1] == "0"


@pytest.mark.parametrize("backend_name", ["postgres", "postgres-pgbouncer-transaction"])
async def test_the_queue_counts_run_without_jit_in_their_own_transaction(manager_for: Any, backend_name: str) -> None:
    """With some 50,000 unfinished runs, PostgreSQL spent 0.5 to 1 s JIT-compiling the queues page's counts
    (a 40 ms query) on every refresh. They run with jit off, set for their transaction only (through a pooler
    in transaction mode too); so do the metrics' backlog counts."""
    # given runs due in a queue, and the jit setting each statistics query runs under recorded
    producer = await manager_for([], enable_worker=False)
    await producer.run_many({"name": "elsewhere", "version": "1"}, [1, 2])
    seen = _record_jit_setting(producer.backend)

    # when the queues page's and the metrics' counts are read
    stats = {s.name: s for s in await producer.queue_stats()}
    backlog = await producer.backend.due_backlog()

    # then both ran with jit off, and still count the runs
    assert seen == {"queue_stats": "off", "due_backlog": "off"}
    assert stats["default"].due == 2
    assert [(queue, count) for queue, _, _, count, _ in backlog] == [("default", 2)]


def _record_jit_setting(backend: Any) -> dict[str, str]:
    """Before the backend runs queue_stats or due_backlog, the jit setting on that connection, in that
    transaction: {query name: setting}."""
    watched = {QUERIES[name]: name for name in ("queue_stats", "due_backlog")}
    seen: dict[str, str] = {}
    connection = backend._connection

    class Recording:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if query in watched:
                cursor = await self.conn.execute("SELECT current_setting('jit')")
                (seen[watched[query]],) = await cursor.fetchone()
            return await self.conn.execute(query, *args, **kwargs)

    @asynccontextmanager
    async def recording(**options: Any) -> AsyncIterator[Any]:
        async with connection(**options) as conn:
            yield Recording(conn)

    backend._connection = recording
    return seen
