"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real database; parents
and children, messages and events, forks and stranded runs on its pages, in process (httpx over ASGI)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from playwright.async_api import async_playwright

from sonamu_tasks import NonRetryableError, RetryPolicy, RunStatus, WorkflowFailed, WorkflowManager, workflow
from sonamu_tasks.cli import main
from sonamu_tasks.dashboard import Dashboard, pages
from sonamu_tasks.testing.postgres_cluster import free_port

from .conftest import wait_until
from .support.dashboard import served

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

broken = {"fragile": True}

FOREVER_SHOWN = re.compile(r"2999-\d\d-\d\d")
"""A wait without a deadline is stored until the year 2999: shown, it would read as a date (a run id may
hold the digits 2999 by chance)."""


async def noop(value: Any) -> Any:
    return value


@workflow(version="1")
async def quick(input: Any, step: Any) -> Any:
    first = await step.define("first", noop).run(input)
    return await step.define("second", noop).run({"echo": first})


@workflow(version="1")
async def napper(step: Any) -> None:
    await step.define("before", noop).run(1)
    await step.sleep("long-nap", "1h")


def fragile_step() -> str:
    if broken["fragile"]:
        raise NonRetryableError("the warehouse is closed")
    return "shipped"


@workflow(version="1")
async def fragile(step: Any) -> str:
    await step.define("prepare", noop).run("ready")
    return str(await step.define("ship", fragile_step).run())


@pytest.fixture
async def dashboard_url(make_config: Any) -> AsyncIterator[tuple[str, Dashboard]]:
    port = free_port()
    app = Dashboard(make_config(enable_worker=False), port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, what="the dashboard to listen")
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    await task


async def test_dashboard_shows_runs_live_and_steers_them(manager_for: Any, dashboard_url: Any) -> None:
    assert Path(CHROMIUM).exists(), "Chromium is needed: apt-get install chromium (.ci/run installs it)"
    base, _ = dashboard_url
    broken["fragile"] = True
    manager = await manager_for([quick, napper, fragile])
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            await page.goto(base + "/")

            # Start a run: the open runs page picks it up and shows it completed, without a reload.
            handle = await manager.run(quick, {"order": 7})
            row_status = page.locator(f"tr[data-run='{handle.id}'] .status")
            await row_status.filter(has_text="completed").wait_for(timeout=15_000)

            await page.click(f"a[href='/runs/{handle.id}']")
            await page.locator("#run-status").filter(has_text="completed").wait_for(timeout=10_000)
            assert await page.locator("svg.timeline rect.bar").count() == 2
            assert '"echo"' in await page.content()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-run-page.png"), full_page=True)

            # Pause a sleeping run and resume it, then cancel it, with its buttons.
            sleeper = await manager.run(napper)
            await wait_until(lambda: _status_is(sleeper, RunStatus.SLEEPING), what="the nap")
            await page.goto(f"{base}/runs/{sleeper.id}")
            assert await page.locator("svg.timeline rect.bar.sleep").count() == 1
            assert await page.locator("#resume").count() == 0
            await page.click("#pause")
            await page.locator("#run-status").filter(has_text="paused").wait_for(timeout=10_000)
            assert await page.locator("#pause").count() == 0
            await page.click("#resume")
            await page.locator("#run-status").filter(has_text="pending").wait_for(timeout=10_000)
            assert await sleeper.status() is RunStatus.PENDING  # due again at its wake time, an hour away
            await page.click("#cancel")
            await page.locator("#run-status").filter(has_text="canceled").wait_for(timeout=10_000)
            assert await sleeper.status() is RunStatus.CANCELED

            # A failed run shows its error; after the fix, Retry resumes it at the failed step.
            failing = await manager.run(fragile)
            await wait_until(lambda: _status_is(failing, RunStatus.FAILED), what="the failure")
            await page.goto(f"{base}/runs/{failing.id}")
            assert "the warehouse is closed" in await page.content()
            broken["fragile"] = False
            await page.click("#retry")
            await page.locator("#run-status").filter(has_text="completed").wait_for(timeout=15_000)
            assert await failing.result(timeout=5) == "shipped"

            await page.goto(base + "/workers")
            assert "quick@1" in await page.content()
            assert await page.locator("td", has_text="default").count() == 1  # the queue it claims from
        finally:
            await browser.close()


async def test_the_live_refresh_asks_again_only_once_answered(dashboard_url: Any) -> None:
    """live.js plans each refresh after the previous answer: a slow dashboard (a busy database) gets one
    refresh at a time, not one more every second piling up behind the others."""
    base, _ = dashboard_url
    asked, in_flight, most = 0, 0, 0

    async def slow(route: Any) -> None:
        nonlocal asked, in_flight, most
        if route.request.headers.get("x-partial") != "1":
            await route.continue_()
            return
        asked, in_flight = asked + 1, in_flight + 1
        most = max(most, in_flight)
        await asyncio.sleep(2.5)  # each answer takes 2.5 refresh periods
        in_flight -= 1
        await route.continue_()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.route("**/*", slow)
            await page.goto(base + "/")
            await page.wait_for_timeout(6_000)
        finally:
            await browser.close()
    assert asked >= 2 and most == 1, (asked, most)


async def test_a_token_is_required_when_set(make_config: Any) -> None:
    port = free_port()
    app = Dashboard(make_config(enable_worker=False), token="s3cret", port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, what="the dashboard to listen")

        # A browser's way in: ?token= once, then the cookie it sets (urllib follows the redirect with it).
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())

        def fetch(path: str) -> tuple[int, str]:
            try:
                with browser.open(f"http://127.0.0.1:{port}{path}") as response:
                    return int(response.status), response.url
            except urllib.error.HTTPError as error:
                return error.code, ""

        assert (await asyncio.to_thread(fetch, "/"))[0] == 401
        assert (await asyncio.to_thread(fetch, "/?token=wrong"))[0] == 401
        assert await asyncio.to_thread(fetch, "/?token=s3cret") == (200, f"http://127.0.0.1:{port}/")
        assert (await asyncio.to_thread(fetch, "/workers"))[0] == 200  # the cookie, without the token
    finally:
        server.should_exit = True
        await task


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


def test_the_command_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    from click.testing import CliRunner

    from sonamu_tasks.cli import main

    result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0"], env={"SONAMU_TASKS_DASHBOARD_TOKEN": ""})
    assert result.exit_code == 1 and "pass --token" in result.output


def test_the_command_says_when_its_port_is_in_use_before_printing_an_address(tmp_path: Path) -> None:
    import socket

    from click.testing import CliRunner

    from sonamu_tasks.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        database = {"SONAMU_TASKS_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}"}
        result = CliRunner().invoke(main, ["dashboard", "--port", str(port)], env=database)
    assert result.exit_code == 1
    assert f"cannot serve the dashboard on 127.0.0.1:{port}: Address already in use" in result.output
    assert "http://" not in result.output


# Parents and children

ELSEWHERE = {"name": "elsewhere", "version": "1"}  # no worker here runs it: its runs stay pending


@workflow(version="1")
async def doubled(input: int) -> int:
    return input * 2


@workflow(version="1")
async def family(input: int, step: Any) -> Any:
    """A finished child, a fan-out of `input` children that stay pending, a detached one, and a sleep."""
    first = await step.run_workflow("first", doubled, 1)
    kids = await step.start_workflows("kids", ELSEWHERE, list(range(input)))
    await step.start_workflow("loose", ELSEWHERE, "x", detached=True)
    await asyncio.gather(step.sleep("nap", "2h"), *(kid.result() for kid in kids))
    return first


@workflow(version="1")
async def only_child(step: Any) -> Any:
    return await step.run_workflow("the-one", ELSEWHERE)


def in_process(make_config: Any, app: Dashboard | None = None) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return served(app or Dashboard(make_config(enable_worker=False), port=8765))


async def waiting_family(manager_for: Any, kids: int) -> tuple[Any, dict[str, str]]:
    """A `family` parent waiting for its children and its nap, and its children's ids by step."""
    manager = await manager_for([family, doubled])
    parent = await manager.run(family, kids)

    # Waiting with every child started: it waits for "first" before it starts the others.
    async def all_started() -> bool:
        return sum((await manager.count_children(parent.id)).values()) == kids + 2

    await wait_until(all_started, what="every child started")
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    children: dict[str, str] = {}
    cursor = None
    while True:
        page = await manager.list_runs(parent_id=parent.id, limit=1000, cursor=cursor)
        children.update({str(child.parent_step): child.id for child in page.items})
        if (cursor := page.next_cursor) is None:
            return parent, children


async def test_a_waiting_parent_links_its_children_and_says_what_it_waits_for(
    manager_for: Any, make_config: Any
) -> None:
    parent, kids = await waiting_family(manager_for, 3)
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{parent.id}")).text
        assert "<span id='run-status' class='status waiting'>waiting</span>" in page
        waits = page.split("<div id='waits-for'>")[1].split("</div>")[0]
        assert "4 unfinished children" in waits  # kids[0..2] and the detached one
        for step in ("kids[0]", "kids[1]", "kids[2]", "loose"):
            assert f"<a href='/runs/{kids[step]}'>{step}</a> (pending)" in waits
        assert "sleep <code>nap</code> until" in waits
        assert re.search(r"<td>nap</td><td>sleep</td>.*?<td>wakes \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", page)
        assert not FOREVER_SHOWN.search(page)

        counts = page.split("<p id='child-counts'>")[1].split("</p>")[0]
        assert counts.startswith("5: ")
        assert f"<a class='status pending' href='/?parent={parent.id}&amp;status=pending'>4 pending</a>" in counts
        assert "status=completed'>1 " in counts and "status=canceled" not in counts
        children = page.split("<table id='children'>")[1].split("</table>")[0]
        assert children.count("<tr data-child=") == 5
        assert f"<a href='/runs/{kids['first']}'>{kids['first']}</a>" in children
        assert "(detached)" in children.split(f"data-child='{kids['loose']}'")[1].split("</tr>")[0]

        # Child steps link to their child: in the timeline and in the step list; a fan-out to the list of children.
        assert f'<a href="/runs/{kids["first"]}"><rect class="bar child" data-step="first"' in page
        assert f"child → <a class='child' href='/runs/{kids['first']}'>{kids['first']}</a> (completed)" in page
        assert f"children → <a href='/?parent={parent.id}'>3 runs</a>" in page

        as_json = (await client.get(f"/api/runs/{parent.id}")).json()
        assert as_json["status"] == "waiting" and as_json["children"]["counts"] == {"pending": 4, "completed": 1}


async def test_a_child_page_links_its_parent(manager_for: Any, make_config: Any) -> None:
    parent, kids = await waiting_family(manager_for, 2)
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{kids['kids[1]']}")).text
        assert (
            f"<p id='parent'>child of <a href='/runs/{parent.id}'>{parent.id}</a> (family@1, "
            "<span class='status waiting'>waiting</span>) · started by its step <code>kids[1]</code></p>"
        ) in page
        assert "detached" not in page.split("<p id='parent'>")[1].split("</p>")[0]
        loose = (await client.get(f"/runs/{kids['loose']}")).text
        assert "started by its step <code>loose</code> · detached" in loose
        assert "<h3>Children</h3>" not in loose and "Waiting for" not in loose
        as_json = (await client.get(f"/api/runs/{kids['loose']}")).json()
        assert as_json["parent_id"] == parent.id and as_json["parent_step"] == "loose" and as_json["detached"] is True


async def test_the_runs_list_filters_by_parent_and_by_waiting(manager_for: Any, make_config: Any) -> None:
    parent, kids = await waiting_family(manager_for, 3)
    async with in_process(make_config) as client:
        listed = (await client.get(f"/?parent={parent.id}")).text
        rows = re.findall(r"<tr data-run='([0-9a-f-]+)'>", listed)
        assert sorted(rows) == sorted(kids.values())
        assert f"children of <a href='/runs/{parent.id}'>{parent.id}</a>" in listed
        assert f"name='parent' size='38' placeholder='run id' value='{parent.id}'" in listed
        row = listed.split(f"<tr data-run='{kids['kids[2]']}'>")[1].split("</tr>")[0]
        assert f"<a href='/runs/{parent.id}' title='{parent.id}'>…{parent.id[-8:]}</a> kids[2]" in row

        api = (await client.get(f"/api/runs?parent={parent.id}&limit=2")).json()
        assert len(api["items"]) == 2 and api["next_cursor"]
        assert {item["parent_id"] for item in api["items"]} == {parent.id}
        rest = (await client.get(f"/api/runs?parent={parent.id}&cursor={api['next_cursor']}")).json()
        assert len(api["items"]) + len(rest["items"]) == len(kids)

        pending = (await client.get(f"/?parent={parent.id}&status=pending")).text
        assert sorted(re.findall(r"<tr data-run='([0-9a-f-]+)'>", pending)) == sorted(
            kids[step] for step in ("kids[0]", "kids[1]", "kids[2]", "loose")
        )

        everything = (await client.get("/")).text
        assert "<option value='waiting'>waiting</option>" in everything
        waiting = (await client.get("/?status=waiting")).text
        assert re.findall(r"<tr data-run='([0-9a-f-]+)'>", waiting) == [parent.id]
        assert "<td class='status waiting'>waiting</td>" in waiting
        api_waiting = (await client.get("/api/runs?status=waiting")).json()["items"]
        assert [item["id"] for item in api_waiting] == [parent.id]
        assert api_waiting[0]["available_at"] is not None  # the nap's wake time

        assert ".waiting{" in (await client.get("/static/dashboard.css")).text

        for bad in ("junk", "%00", "-" * 36, parent.id + "0"):
            response = await client.get(f"/?parent={bad}")
            assert response.status_code == 400 and "parent" in response.text, bad
            assert (await client.get(f"/api/runs?parent={bad}")).status_code == 400, bad


async def test_a_run_waiting_only_for_a_child_shows_no_wake_time(manager_for: Any, make_config: Any) -> None:
    manager = await manager_for([only_child])
    parent = await manager.run(only_child)
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    [child] = (await manager.list_runs(parent_id=parent.id)).items
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{parent.id}")).text
        assert f"1 unfinished child: <a href='/runs/{child.id}'>the-one</a> (pending)" in page
        assert not FOREVER_SHOWN.search(page) and "sleep <code>" not in page
        assert (await client.get(f"/api/runs/{parent.id}")).json()["available_at"] is None
        assert (await client.get("/api/runs?status=waiting")).json()["items"][0]["available_at"] is None
        assert not FOREVER_SHOWN.search((await client.get("/")).text)


async def test_a_fan_out_of_1000_children_is_counted_and_listed_in_part(manager_for: Any, make_config: Any) -> None:
    parent, kids = await waiting_family(manager_for, 1000)
    assert len(kids) == 1002
    app = Dashboard(make_config(enable_worker=False), port=8765)
    read = _count_runs_read(app)
    async with in_process(make_config, app) as client:
        response = await client.get(f"/runs/{parent.id}")
        # Counted by the database; only the children listed (and those searched for the first unfinished
        # ones) are read, not the 1,002 of them, on every refresh of the page.
        assert read["runs"] <= 50, read
        assert response.status_code == 200
        page = response.text
        assert len(response.content) < 100_000
        counts = page.split("<p id='child-counts'>")[1].split("</p>")[0]
        assert counts.startswith("1002: ") and "status=pending'>1001 pending</a>" in counts
        assert "status=completed'>1 completed</a>" in counts
        assert page.split("<table id='children'>")[1].split("</table>")[0].count("<tr data-child=") == 20
        assert f"<a href='/?parent={parent.id}'>all 1002 children</a> (982 not shown above)" in page
        assert "1001 unfinished children" in page
        assert f"<a href='/?parent={parent.id}'>981 more</a>" in page  # 20 of the unfinished ones are linked

        first_page = (await client.get(f"/?parent={parent.id}")).text
        assert first_page.count("<tr data-run=") == 50
        older = re.search(r"<a href='/\?([^']+)'>older runs</a>", first_page)
        assert older is not None and f"parent={parent.id}" in older.group(1)


def _count_runs_read(app: Dashboard) -> dict[str, int]:
    """Counts the run records the dashboard's manager reads (one per get_run, one per listed run)."""
    read = {"runs": 0}
    get_run, list_runs = app.manager.get_run, app.manager.list_runs

    async def counted_get_run(run_id: str, **options: Any) -> Any:
        read["runs"] += 1
        return await get_run(run_id, **options)

    async def counted_list_runs(**options: Any) -> Any:
        page = await list_runs(**options)
        read["runs"] += len(page.items)
        return page

    app.manager.get_run = counted_get_run  # type: ignore[method-assign]
    app.manager.list_runs = counted_list_runs  # type: ignore[method-assign]
    return read


async def test_the_browser_follows_a_child_step_to_the_child_and_back(manager_for: Any, dashboard_url: Any) -> None:
    base, _ = dashboard_url
    parent, kids = await waiting_family(manager_for, 2)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            await page.goto(f"{base}/runs/{parent.id}")
            await page.locator("#run-status").filter(has_text="waiting").wait_for(timeout=10_000)
            await page.screenshot(path=str(ARTIFACTS / "dashboard-parent-page.png"), full_page=True)
            await page.click(f"svg.timeline a[href='/runs/{kids['first']}'] rect")
            await page.wait_for_url(f"{base}/runs/{kids['first']}")
            await page.locator("#run-status").filter(has_text="completed").wait_for(timeout=10_000)
            await page.click(f"#parent a[href='/runs/{parent.id}']")
            await page.wait_for_url(f"{base}/runs/{parent.id}")
            await page.click(f"#children a[href='/runs/{kids['kids[1]']}']")
            await page.wait_for_url(f"{base}/runs/{kids['kids[1]']}")
            await page.screenshot(path=str(ARTIFACTS / "dashboard-child-page.png"), full_page=True)
        finally:
            await browser.close()


async def test_a_run_page_draws_and_lists_at_most_300_steps(manager_for: Any, make_config: Any) -> None:
    @workflow(version="1")
    async def many(step: Any) -> Any:
        return len(await step.map("item", noop, range(310)))

    manager = await manager_for([many])
    handle = await manager.run(many)
    assert await handle.result(timeout=30) == 310
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{handle.id}")).text
        assert page.count('<rect class="bar') == 300
        assert f"the first 300 of 310 steps; all of them in <a href='/api/runs/{handle.id}'>" in page
        assert len((await client.get(f"/api/runs/{handle.id}")).json()["steps"]) == 310


# Messages and events


@workflow(version="1")
async def inbox(step: Any) -> Any:
    """Publishes its progress, then waits for an approval (with a timeout) and a payment event at once."""
    await step.set_event("progress", {"done": 40})
    approval, paid = await asyncio.gather(
        step.receive("wait-approval", topic="approval", timeout="1h"),
        step.wait_for_event("paid", "order.paid", key="7"),
    )
    await step.set_event("progress", {"done": 100})
    return {"approval": approval, "paid": paid}


@workflow(version="1")
async def approval(step: Any) -> Any:
    return await step.receive("wait-approval", topic="approval", timeout="1h")


async def waiting(manager: Any, definition: Any) -> Any:
    handle = await manager.run(definition)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait")
    return handle


FORM_HEADERS = {"Origin": "http://127.0.0.1:8765"}


async def test_a_waiting_run_page_shows_its_topic_its_messages_and_its_events(
    manager_for: Any, make_config: Any
) -> None:
    manager = await manager_for([inbox])
    handle = await waiting(manager, inbox)
    for index in range(22):  # on a topic nobody receives: they stay
        await manager.send(handle.id, {"note": index}, topic="notes", idempotency_key=f"note-{index}")
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait again")
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{handle.id}")).text
        waits = page.split("<div id='waits-for'>")[1].split("</div>")[0]
        assert re.search(
            r"message on topic <code>approval</code> \(step <code>wait-approval</code>\) · times out "
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
            waits,
        )
        assert "event <code>order.paid</code> with key <code>7</code> (step <code>paid</code>) · no timeout" in waits
        assert "<td>wait-approval</td><td>receive</td><td class='status waiting'>waiting</td>" in page

        assert "<p id='message-count'>22 unconsumed, oldest first</p>" in page
        messages = page.split("<table id='messages'>")[1].split("</table>")[0]
        assert messages.count("<tr data-message=") == 20
        assert re.search(
            r"<td>notes</td><td>\{&quot;note&quot;: 0\}</td><td>note-0</td><td>[^<]+ UTC \(\d+m?s ago\)", messages
        )
        assert "note-20" not in messages and "and 2 more" in page
        events = page.split("<table id='events'>")[1].split("</table>")[0]
        assert "<td>progress</td><td>{&quot;done&quot;: 40}</td>" in events

        # The message form: outside the part that refreshes, its topic the one the run waits on.
        live, after = page.split("<div id='live'", 1)[1].rsplit("</div>", 1)
        assert "/send'" not in live and "<a href='#send-message'>send it one</a>" in waits
        form = after.split("<section id='send-message' data-unfinished-only>")[1].split("</section>")[0]
        assert f"action='/runs/{handle.id}/send'" in form and "name='topic' value='approval'" in form
        assert "name='csrf'" in form and "<textarea name='message'" in form and "name='idempotency_key'" in form

        detail = (await client.get(f"/api/runs/{handle.id}")).json()
        assert detail["messages"]["total"] == 22 and len(detail["messages"]["listed"]) == 22
        assert detail["events"][0]["key"] == "progress" and detail["events"][0]["value"] == {"done": 40}


@workflow(version="1")
async def approving_parent(step: Any) -> Any:
    return await step.run_workflow("approve", approval)


cli_config: Any = None  # the config `sonamu-tasks --config tests.test_dashboard:cli_config` reads


async def test_the_json_of_a_run_is_the_command_lines_for_a_waiting_child(
    manager_for: Any, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/api/runs/{id} is `show --json` and /api/runs's items are `runs --json`'s, field for field (one function
    builds each for both): for a child run waiting for a message, its parent, what it waits for, its steps."""
    manager = await manager_for([approving_parent, approval])
    parent = await manager.run(approving_parent)
    child = await wait_until(
        lambda: _waiting_child(manager, parent.id), what="the child to wait for its message", timeout=20
    )
    monkeypatch.setattr(sys.modules[__name__], "cli_config", make_config(enable_worker=False))

    def command(*args: str) -> Any:
        done = CliRunner().invoke(main, ["--config", f"{__name__}:cli_config", *args])
        assert done.exit_code == 0, (args, done.output)
        return json.loads(done.stdout)

    shown = await asyncio.to_thread(command, "show", child, "--json")
    listed = await asyncio.to_thread(command, "runs", "--parent", parent.id, "--json")
    async with in_process(make_config) as client:
        api = (await client.get(f"/api/runs/{child}")).json()
        api_list = (await client.get(f"/api/runs?parent={parent.id}")).json()
    assert api == shown
    assert api_list == listed
    assert shown["workflow"] == "approval" and "workflow_name" not in shown
    assert shown["parent"] == {
        "id": parent.id,
        "workflow": "approving_parent",
        "version": "1",
        "status": "waiting",
        "step": "approve",
        "detached": False,
    }
    assert [wait["topic"] for wait in shown["waiting_for"]["messages"]] == ["approval"]
    assert shown["steps"][0]["waits_for"] == {"topic": "approval"}
    assert [item["id"] for item in listed["items"]] == [child]


async def _waiting_child(manager: Any, parent_id: str) -> str | None:
    page = await manager.list_runs(parent_id=parent_id, status="waiting")
    return page.items[0].id if page.items else None


async def test_the_message_form_sends_a_message_the_run_receives(manager_for: Any, make_config: Any) -> None:
    manager = await manager_for([inbox])
    handle = await waiting(manager, inbox)
    app = Dashboard(make_config(enable_worker=False), port=8765)
    async with in_process(make_config, app) as client:
        form = {"csrf": app.csrf, "topic": "approval", "message": '{"approved": true}', "idempotency_key": "mail-1"}
        sent = await client.post(f"/runs/{handle.id}/send", data=form, headers=FORM_HEADERS)
        assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{handle.id}?sent=1"
        assert "<p id='notice' class='notice'>Message sent.</p>" in (await client.get(sent.headers["location"])).text
        again = await client.post(f"/runs/{handle.id}/send", data={**form, "message": "2"}, headers=FORM_HEADERS)
        assert again.headers["location"] == f"/runs/{handle.id}?sent=again"
        assert "Not sent again" in (await client.get(again.headers["location"])).text

        await manager.emit("order.paid", {"amount": 10.5}, key="7")
        assert await handle.result(timeout=15) == {"approval": {"approved": True}, "paid": {"amount": 10.5}}
        finished = (await client.get(f"/runs/{handle.id}")).text
        assert "send-message" not in finished and "<table id='messages'>" not in finished  # consumed, once
        assert "<td>progress</td><td>{&quot;done&quot;: 100}</td>" in finished


async def test_an_action_that_does_nothing_says_so_on_the_run_page(manager_for: Any, make_config: Any) -> None:
    """A second operator's Retry of a run someone retried and saw finish redirected as if it had worked. Now
    the run page says nothing was done, in the words of `sonamu-tasks retry`; an action that did something
    redirects as before."""
    # given a completed run, a sleeping one and one not due for an hour
    manager = await manager_for([quick, napper])
    done = await manager.run(quick, 1)
    await done.result(timeout=15)
    sleeper = await manager.run(napper)
    await wait_until(lambda: _status_is(sleeper, RunStatus.SLEEPING), what="the nap")
    later = await manager.run(quick, 2, start_at="1h")
    app = Dashboard(make_config(enable_worker=False), port=8765)
    async with in_process(make_config, app) as client:
        # when each action is posted to a run it does not apply to
        for action, run_id, refusal in (
            ("retry", done.id, "completed: not retried (only a failed or canceled run is retried)"),
            ("cancel", done.id, "completed: not canceled (a finished run is left as it is)"),
            ("pause", done.id, "completed: not paused (only an unfinished run not being canceled is paused)"),
            ("resume", done.id, "completed: not resumed (only a paused run, or one asked to pause, is resumed)"),
            ("resume", sleeper.id, "sleeping: not resumed (only a paused run, or one asked to pause, is resumed)"),
        ):
            answer = await client.post(f"/runs/{run_id}/{action}", data={"csrf": app.csrf}, headers=FORM_HEADERS)
            # then its run page says nothing was done, and why
            status = refusal.partition(":")[0]
            assert answer.status_code == 303, action
            assert answer.headers["location"] == f"/runs/{run_id}?not_steered={action}&status={status}"
            page = (await client.get(answer.headers["location"])).text
            assert f"<p id='notice' class='notice'>Nothing done: run {run_id} is {refusal}.</p>" in page

        # and one that did something redirects to the run page without a notice
        paused = await client.post(f"/runs/{later.id}/pause", data={"csrf": app.csrf}, headers=FORM_HEADERS)
        assert paused.headers["location"] == f"/runs/{later.id}"
        assert await later.status() is RunStatus.PAUSED
        # a notice made up in the address is not shown
        forged = (await client.get(f"/runs/{later.id}?not_steered=retry&status=<b>")).text
        assert "id='notice'" not in forged


async def test_the_browser_sends_a_message_from_the_run_page(manager_for: Any, dashboard_url: Any) -> None:
    base, _ = dashboard_url
    manager = await manager_for([approval])
    handle = await waiting(manager, approval)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            await page.goto(f"{base}/runs/{handle.id}")
            await page.locator("#run-status").filter(has_text="waiting").wait_for(timeout=10_000)
            assert await page.input_value("#send-message input[name='topic']") == "approval"
            await page.fill("#send-message textarea[name='message']", '{"approved": true, "by": "kim"}')
            await page.wait_for_timeout(1500)  # the page refreshes meanwhile: what was typed stays
            assert await page.input_value("#send-message textarea[name='message']") == (
                '{"approved": true, "by": "kim"}'
            )
            await page.screenshot(path=str(ARTIFACTS / "dashboard-waiting-page.png"), full_page=True)
            await page.click("#send")
            await page.locator("#notice").wait_for(timeout=10_000)
            await page.locator("#run-status").filter(has_text="completed").wait_for(timeout=15_000)
            await page.locator("#send-message").wait_for(state="detached", timeout=5_000)  # gone once finished
            assert await handle.result(timeout=5) == {"approved": True, "by": "kim"}
        finally:
            await browser.close()


# Forks and stranded runs

ONCE = RetryPolicy(max_attempts=1)


async def load(order: int) -> dict[str, int]:
    return {"order": order, "total": 30}


async def charge_buggy(loaded: dict[str, int]) -> str:
    raise ValueError("bug in charge")


async def charge_fixed(loaded: dict[str, int]) -> str:
    return f"charged {loaded['total']} for {loaded['order']}"


def checkout_version(version: str, charge: Any) -> Any:
    async def checkout(input: int, step: Any) -> Any:
        loaded = await step.define("load", load).run(input)
        return await step.define("charge", charge).run(loaded)

    return workflow(checkout, version=version, retry_policy=ONCE)


checkout_v1 = checkout_version("1", charge_buggy)
checkout_v2 = checkout_version("2", charge_fixed)


async def failed_checkout(manager: Any) -> str:
    handle = await manager.run(checkout_v1, 7)
    assert (await manager.wait_until_finished(handle.id, timeout=15)).status is RunStatus.FAILED
    return str(handle.id)


async def test_fork_from_here_on_a_step_starts_the_fork_and_opens_its_page(manager_for: Any, make_config: Any) -> None:
    manager = await manager_for([checkout_v1, checkout_v2])
    source = await failed_checkout(manager)
    app = Dashboard(make_config(enable_worker=False), port=8765)
    async with in_process(make_config, app) as client:
        page = (await client.get(f"/runs/{source}")).text
        # One form, before the part that refreshes (what is typed stays); a button on every step submits it.
        before, live = page.split("<div id='live'", 1)
        form = before.split("<form id='fork-form'")[1].split("</form>")[0]
        assert f"action='/runs/{source}/fork'" in form and f"name='csrf' value='{app.csrf}'" in form
        assert "<input name='version'" in form and "placeholder='1'" in form
        assert form.index("<button type='submit' disabled hidden>") < form.index("name='csrf'")  # Enter: nothing
        for step in ("load", "charge"):
            assert f"form='fork-form' name='from_step' value='{step}'>Fork from here</button>" in live

        fork = {"csrf": app.csrf, "from_step": "charge", "version": "2"}
        created = await client.post(f"/runs/{source}/fork", data=fork, headers=FORM_HEADERS)
        assert created.status_code == 303
        location = created.headers["location"]
        match = re.fullmatch(rf"/runs/([0-9a-f-]{{36}})\?forked_from={source}&step=charge", location)
        assert match is not None, location
        forked = match.group(1)
        assert await manager.wait_for_result(forked, timeout=15) == "charged 30 for 7"
        run = await manager.get_run(forked, with_steps=True)
        assert run.version == "2"
        assert [(s.name, s.output) for s in run.steps] == [
            ("load", {"order": 7, "total": 30}),
            ("charge", "charged 30 for 7"),
        ]
        opened = (await client.get(location)).text
        assert (
            f"<p id='notice' class='notice'>Forked from run <a href='/runs/{source}'>{source}</a> at step "
            "<code>charge</code>.</p>"
        ) in opened
        assert "<span id='run-status' class='status completed' data-finished>completed</span>" in opened

        same = await client.post(f"/runs/{source}/fork", data={**fork, "version": ""}, headers=FORM_HEADERS)
        same_id = same.headers["location"].split("/runs/")[1].split("?")[0]
        assert (await manager.get_run(same_id)).version == "1"  # no version: the run's own

        # A step the run does not have, a missing or bad field, an unknown run: a 4xx that says why.
        runs_before = len((await manager.list_runs(workflow="checkout")).items)
        for change, status, says in (
            ({"from_step": "ship"}, 400, f"run {source} has no step 'ship' to fork from; its steps: 'load', 'charge'"),
            ({"from_step": ""}, 400, "from_step: missing"),
            ({"from_step": "a\x00b"}, 400, "from_step: step name holds the character"),
            ({"version": "   "}, 400, "version: workflow version must not be blank"),
            ({"version": "v" * 300}, 400, "version: workflow version is 300 characters long"),
        ):
            refused = await client.post(f"/runs/{source}/fork", data={**fork, **change}, headers=FORM_HEADERS)
            assert refused.status_code == status and says in refused.text, (change, refused.status_code, refused.text)
        unknown = await client.post("/runs/0190b7e2-5c3a-7d1e-8f00-1234567890ab/fork", data=fork, headers=FORM_HEADERS)
        assert unknown.status_code == 404 and "no run with id" in unknown.text
        assert len((await manager.list_runs(workflow="checkout")).items) == runs_before


async def test_the_runs_list_warns_of_stranded_runs_and_links_their_version(manager_for: Any, make_config: Any) -> None:
    manager = await manager_for([checkout_v1])  # its worker registers checkout version 1 only
    served = await manager.run(checkout_v1, 1, start_at="1h")
    await wait_until(lambda: _registered(manager), what="the worker to register")
    async with in_process(make_config) as client:
        assert "id='stranded'" not in (await client.get("/")).text
        assert (await client.get("/api/stranded")).json() == {"stale_after": 60.0, "groups": []}

        retired = [(await manager.run({"name": "checkout", "version": "0"}, order)).id for order in range(2)]
        await manager.pause(retired[0])
        page = (await client.get("/")).text
        banner = page.split("<div id='stranded' class='warning'>")[1].split("</div>")[0]
        assert "<strong>2 stranded runs</strong>: no live worker registers these versions" in banner
        assert (
            "<li data-stranded='checkout@0'><a href='/?workflow=checkout&amp;version=0'>checkout@0</a>: "
            "2 unfinished (1 pending, 1 paused), the oldest created "
        ) in banner
        assert "sonamu-tasks runs --stranded" in banner
        assert page.index("id='stranded'") < page.index("<div id='live'")  # not redrawn every second
        assert "id='stranded'" not in (await client.get("/", headers={"X-Partial": "1"})).text
        (group,) = (await client.get("/api/stranded")).json()["groups"]
        assert (group["workflow"], group["version"], group["counts"], group["total"]) == (
            "checkout",
            "0",
            {"pending": 1, "paused": 1},
            2,
        )
        assert group["oldest_age_s"] >= 0

        # The link: the runs list filtered by workflow and version (and its JSON), the version kept in the form.
        listed = (await client.get("/?workflow=checkout&version=0")).text
        assert sorted(re.findall(r"<tr data-run='([0-9a-f-]+)'>", listed)) == sorted(retired)
        assert "version <input name='version' size='8' value='0'>" in listed
        api = (await client.get("/api/runs?workflow=checkout&version=0")).json()["items"]
        assert sorted(item["id"] for item in api) == sorted(retired)
        assert [item["id"] for item in (await client.get("/api/runs?version=1")).json()["items"]] == [served.id]
        for bad in ("%00", "%20", "a%09b", "v" * 300):
            response = await client.get(f"/?version={bad}")
            assert response.status_code == 400 and response.text.startswith("version: "), bad
            assert (await client.get(f"/api/runs?version={bad}")).status_code == 400, bad

        for run_id in retired:
            await manager.cancel(run_id)
        assert "id='stranded'" not in (await client.get("/")).text


async def test_the_browser_forks_a_failed_run_from_its_failed_step(manager_for: Any, dashboard_url: Any) -> None:
    base, _ = dashboard_url
    manager = await manager_for([checkout_v1, checkout_v2])
    source = await failed_checkout(manager)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            await page.goto(f"{base}/runs/{source}")
            await page.locator("#run-status").filter(has_text="failed").wait_for(timeout=10_000)
            await page.fill("#fork-form input[name='version']", "2")
            await page.press("#fork-form input[name='version']", "Enter")  # submits nothing: no step chosen
            await page.wait_for_timeout(300)
            assert page.url == f"{base}/runs/{source}"
            assert len((await manager.list_runs(workflow="checkout")).items) == 1
            await page.screenshot(path=str(ARTIFACTS / "dashboard-fork.png"), full_page=True)
            await page.click("button.fork[value='charge']")
            await page.wait_for_url(re.compile(rf"/runs/[0-9a-f-]{{36}}\?forked_from={source}&step=charge$"))
            await page.locator("#run-status").filter(has_text="completed").wait_for(timeout=15_000)
            assert "Forked from run" in await page.inner_text("#notice")
            forked = page.url.split("/runs/")[1].split("?")[0]
            assert await manager.wait_for_result(forked, timeout=5) == "charged 30 for 7"
            assert (await manager.get_run(forked)).version == "2"
        finally:
            await browser.close()


async def _registered(manager: Any) -> bool:
    return any(worker.workflows for worker in await manager.list_workers())


async def test_the_dashboard_serves_prometheus_metrics(manager_for: Any, make_config: Any) -> None:
    manager = await manager_for([checkout_v1])  # its charge step always fails
    with pytest.raises(WorkflowFailed):
        await (await manager.run(checkout_v1, 1)).result(timeout=15)
    async with in_process(make_config) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'sonamu_tasks_runs_failed_total{workflow="checkout"}' in response.text


async def test_the_schedules_page_says_which_schedules_no_live_worker_fires(manager_for: Any, make_config: Any) -> None:
    from sonamu_tasks import Schedule

    @workflow(version="1", schedules=[Schedule("0 9 * * *", name="morning")])
    async def served(input: Any) -> Any:
        return input

    @workflow(version="1", schedules=[Schedule("0 18 * * *", name="evening")])
    async def gone(input: Any) -> Any:
        return input

    async with WorkflowManager(make_config(), workflows=[gone]):
        pass  # its worker stored the schedule, then left
    await manager_for([served])
    async with in_process(make_config) as client:
        page = (await client.get("/schedules")).text
    rows = {row.split("</td>")[0].rsplit(">", 1)[-1]: row for row in page.split("<tr><td>")[1:]}
    assert "live workers" in rows["morning"] and "nobody" not in rows["morning"]
    assert "<strong>nobody</strong>" in rows["evening"]


async def test_the_dashboards_metrics_show_the_due_backlog_per_queue(make_config: Any) -> None:
    """The dashboard runs no worker, whose loop refreshes the backlog gauges: it reads them as it is scraped."""
    async with WorkflowManager(make_config(enable_worker=False)) as producer:
        for _ in range(3):
            await producer.run({"name": "nobody-serves-this", "version": "1"}, None)
    async with in_process(make_config) as client:
        response = await client.get("/metrics")
    sample = 'sonamu_tasks_backlog{queue="default",version="1",workflow="nobody-serves-this"} 3.0'
    assert sample in response.text, [line for line in response.text.splitlines() if "backlog" in line]


async def test_a_huge_output_is_cut_by_the_database_for_the_run_page(manager_for: Any, make_config: Any) -> None:
    """The run page reads at most its 20 kB of a value (a capped read: the database cuts it); the JSON view
    and the manager's plain read still give the whole value."""
    from sonamu_tasks.records import CutValue

    @workflow(version="1")
    async def big(input: Any, step: Any) -> Any:
        rows = await step.define("rows", lambda: [{"n": i, "pad": "x" * 90} for i in range(3000)]).run()
        return {"rows": rows, "small": 1}

    manager = await manager_for([big])
    handle = await manager.run(big)
    output = await handle.result(timeout=30)
    capped = await manager.get_run(handle.id, with_steps=True, value_limit=1000)
    assert isinstance(capped.output, CutValue) and len(capped.output.excerpt) == 1000
    assert capped.output.length > 300_000 and capped.output.excerpt.startswith('{"')
    [step] = capped.steps
    assert isinstance(step.output, CutValue) and step.output.length > 300_000
    assert capped.input is None  # short values come whole
    full = await manager.get_run(handle.id, with_steps=True)
    assert full.output == output and full.steps[0].output == output["rows"]
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{handle.id}")).text
        assert "cut at 20,000 characters" in page and len(page) < 120_000
        assert (await client.get(f"/api/runs/{handle.id}")).json()["output"] == output


async def test_the_runs_list_and_api_runs_read_no_input(manager_for: Any, make_config: Any) -> None:
    """The runs list, refreshed every second, and /api/runs show no value, and read none (`value_limit=0`: an
    empty CutValue, not even measured): 2 MB inputs are not read at each refresh; /api/runs/{id} has them."""
    from sonamu_tasks.records import CutValue

    manager = await manager_for(enable_worker=False)
    bulky = await manager.run({"name": "bulky", "version": "1"}, {"blob": "y" * 500_000})
    app = Dashboard(make_config(enable_worker=False), port=8765)
    listed: list[Any] = []
    read = app.manager.backend.list_runs

    async def spied(query: Any) -> Any:
        found = await read(query)
        listed.extend(found)
        return found

    app.manager.backend.list_runs = spied  # type: ignore[method-assign]
    async with in_process(make_config, app) as client:
        page = await client.get("/?workflow=bulky", headers={"X-Partial": "1"})
        assert bulky.id in page.text and len(page.text) < 5_000
        api = await client.get("/api/runs?workflow=bulky")
        [item] = api.json()["items"]
        assert item["id"] == bulky.id and "input" not in item and len(api.content) < 5_000
        assert (await client.get(f"/api/runs/{bulky.id}")).json()["input"] == {"blob": "y" * 500_000}
    assert len(listed) == 2 and all(run.input == CutValue("", None) for run in listed)


async def test_a_running_run_asked_to_pause_offers_resume_which_withdraws_the_request(manager_for: Any) -> None:
    manager = await manager_for([napper])
    sleeper = await manager.run(napper)
    await wait_until(lambda: _status_is(sleeper, RunStatus.SLEEPING), what="the nap")
    record = await manager.get_run(sleeper.id, with_steps=True)
    asked = dataclasses.replace(record, status=RunStatus.RUNNING, requested_action="pause")
    page = pages.run_detail(asked, "token")
    assert f"action='/runs/{sleeper.id}/resume'" in page and "/pause'" not in page
    running = pages.run_detail(dataclasses.replace(asked, requested_action=None), "token")
    assert f"action='/runs/{sleeper.id}/pause'" in running and "/resume'" not in running
    canceling = pages.run_detail(dataclasses.replace(asked, requested_action="cancel"), "token")
    assert "/pause'" not in canceling and "/resume'" not in canceling and "/cancel'" in canceling
    finished = pages.run_detail(dataclasses.replace(record, status=RunStatus.COMPLETED), "token")
    assert "/pause'" not in finished and "/resume'" not in finished and "/cancel'" not in finished


async def test_a_running_runs_page_and_show_name_the_worker_executing_it(manager_for: Any, make_config: Any) -> None:
    """Which worker holds a run was only in `show --json`: an operator chasing a stuck run had to guess."""
    release = asyncio.Event()

    async def held() -> str:
        await release.wait()
        return "done"

    @workflow(version="1")
    async def holds(step: Any) -> Any:
        return await step.define("held", held).run()

    manager = await manager_for([holds])
    handle = await manager.run(holds)
    await wait_until(lambda: _status_is(handle, RunStatus.RUNNING), what="the run to run")
    worker_id = manager.worker.id
    async with in_process(make_config) as client:
        page = (await client.get(f"/runs/{handle.id}")).text
        assert f"<p id='run-worker'>worker <code>{worker_id}</code> · lease until " in page
        release.set()
        await handle.result(timeout=15)
        assert "run-worker" not in (await client.get(f"/runs/{handle.id}")).text  # finished: nobody holds it
