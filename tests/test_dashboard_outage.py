"""The dashboard while PostgreSQL is down: its /metrics still answers (a scrape used to wait for the database
for the whole outage, timing out and taking the dashboard's own series with it)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import httpx
import pytest

from sonamu_tasks import WorkflowManager, define_config
from sonamu_tasks.dashboard import Dashboard
from sonamu_tasks.testing import PostgresCluster, PostgresNotInstalled

BACKLOG = 'sonamu_tasks_backlog{queue="default",version="1",workflow="outage-unserved"} 1.0'


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: stopping the shared one would disturb the other tests."""
    try:
        cluster = PostgresCluster(fsync=False)
    except PostgresNotInstalled as error:
        if os.environ.get("SONAMU_TASKS_TEST_DATABASE_URL"):
            pytest.skip(f"stopping a server needs local PostgreSQL binaries: {error}")
        raise
    with cluster:
        yield cluster


async def test_the_dashboards_metrics_answer_while_the_database_is_down(own_cluster: PostgresCluster) -> None:
    config = define_config(database_url=own_cluster.url, schema="dashboard_outage", tasks={"enable_worker": False})
    async with WorkflowManager(config) as producer:
        await producer.run({"name": "outage-unserved", "version": "1"}, None)
    app = Dashboard(config, port=8765)
    await app.manager.start()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as client:
            assert BACKLOG in (await client.get("/metrics")).text

            await asyncio.to_thread(own_cluster.stop, "fast")
            # A bound on a hang, not a speed check: the backlog read gives up after 2 s.
            response = await asyncio.wait_for(client.get("/metrics"), 20)
            assert response.status_code == 200
            text = response.text
            assert text.startswith("# backlog gauges left out: could not read the backlog"), text[:300]
            assert "sonamu_tasks_runs_started_total" in text  # the process's other series are served
            assert "sonamu_tasks_backlog{" not in text  # no stale count that would look current

            await asyncio.to_thread(own_cluster.start)
            text = (await asyncio.wait_for(client.get("/metrics"), 60)).text
            assert BACKLOG in text and "left out" not in text
    finally:
        if not await asyncio.to_thread(own_cluster.is_running):
            await asyncio.to_thread(own_cluster.start)
        await app.manager.stop()
