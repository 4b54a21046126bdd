"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real database."""

from __future__ import annotations

import asyncio
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.async_api import async_playwright

from sonamu_tasks import NonRetryableError, RunStatus, workflow
from sonamu_tasks.dashboard import Dashboard
from sonamu_tasks.testing.postgres_cluster import free_port

from .conftest import wait_until

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


async def test_dashboard_shows_runs_live_and_cancels_and_retries(manager_for: Any, dashboard_url: Any) -> None:
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

            # Cancel a sleeping run with its button.
            sleeper = await manager.run(napper)
            await wait_until(lambda: _status_is(sleeper, RunStatus.SLEEPING), what="the nap")
            await page.goto(f"{base}/runs/{sleeper.id}")
            assert await page.locator("svg.timeline rect.bar.sleep").count() == 1
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
        finally:
            await browser.close()


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
