"""Dashboard: an ASGI app (no framework) over a WorkflowManager that runs no worker.

    GET  /                    runs, newest first, filters (workflow, status), live refresh
    GET  /runs/{id}           a run: status, step timeline, steps, input, output or error; cancel / retry
    POST /runs/{id}/cancel    (and /retry) then back to the run page
    GET  /workers, /schedules
    GET  /api/runs, /api/runs/{id}   the same as JSON

With a token (required to listen beyond loopback), every request carries it: `Authorization: Bearer`, or
`?token=` once (kept in a cookie). Forms carry a per-process CSRF value.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from ..config import Config
from ..errors import RunNotFound, SonamuTasksError
from ..manager import WorkflowManager
from . import pages

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_RUN = re.compile(r"^/(api/)?runs/([0-9a-f-]{36})(?:/(cancel|retry))?$")


class Dashboard:
    def __init__(self, config: Config, *, token: str | None = None) -> None:
        config = dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, enable_worker=False))
        self.manager = WorkflowManager(config)
        self.token = token
        self.csrf = secrets.token_urlsafe(16)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.manager.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.manager.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        extra_headers: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            if not self._authorized(headers, query):
                await _respond(send, 401, "text/plain", "a token is required: ?token=...")
                return
            if query.get("token"):
                extra_headers.append((b"set-cookie", f"sonamu_token={self.token}; HttpOnly; SameSite=Strict".encode()))
        try:
            status, content_type, body, location = await self._route(scope, receive, headers, query)
        except RunNotFound as error:
            status, content_type, body, location = 404, "text/plain", str(error), None
        except SonamuTasksError as error:
            status, content_type, body, location = 400, "text/plain", str(error), None
        if location:
            extra_headers.append((b"location", location.encode()))
        await _respond(send, status, content_type, body, extra_headers)

    async def _route(
        self, scope: Scope, receive: Receive, headers: dict[str, str], query: dict[str, str]
    ) -> tuple[int, str, str, str | None]:
        method, path = scope["method"], scope["path"]
        partial = headers.get("x-partial") == "1"
        if method == "GET" and path in ("/", "/api/runs"):
            page = await self.manager.list_runs(
                workflow=query.get("workflow") or None,
                status=query.get("status") or None,
                limit=int(query.get("limit", "50")),
                cursor=query.get("cursor") or None,
            )
            if path == "/api/runs":
                items = [_jsonable(run) for run in page.items]
                return 200, "application/json", json.dumps({"items": items, "next_cursor": page.next_cursor}), None
            table = pages.runs_table(page.items, page.next_cursor, {k: v for k, v in query.items() if k != "cursor"})
            if partial:
                return 200, "text/html", table, None
            filters = pages.runs_filters(query.get("workflow", ""), query.get("status", ""))
            return (
                200,
                "text/html",
                pages.page("Runs", table).replace("<div id='live'>", filters + "<div id='live'>"),
                None,
            )
        match = _RUN.match(path)
        if match:
            api, run_id, action = match.groups()
            if method == "POST" and action and not api:
                form = parse_qs((await _body(receive)).decode())
                if not hmac.compare_digest(form.get("csrf", [""])[0], self.csrf):
                    return 403, "text/plain", "bad or missing form token; reload the page", None
                await (self.manager.cancel(run_id) if action == "cancel" else self.manager.retry(run_id))
                return 303, "text/plain", "", f"/runs/{run_id}"
            if method == "GET" and not action:
                run = await self.manager.get_run(run_id, with_steps=True)
                if api:
                    return 200, "application/json", json.dumps(_jsonable(run)), None
                detail = pages.run_detail(run, self.csrf)
                if partial:
                    return 200, "text/html", detail, None
                return 200, "text/html", pages.page(f"Run {run_id}", detail), None
        if method == "GET" and path == "/workers":
            body = pages.workers_table(await self.manager.list_workers())
            return 200, "text/html", body if partial else pages.page("Workers", body), None
        if method == "GET" and path == "/schedules":
            schedules = await self.manager.backend.list_schedules()
            body = pages.schedules_table(schedules)
            return 200, "text/html", body if partial else pages.page("Schedules", body, refresh_ms=5000), None
        return 404, "text/plain", "not found", None

    def _authorized(self, headers: dict[str, str], query: dict[str, str]) -> bool:
        assert self.token is not None
        offered = [query.get("token", ""), headers.get("authorization", "").removeprefix("Bearer ")]
        cookie = SimpleCookie(headers.get("cookie", ""))
        if "sonamu_token" in cookie:
            offered.append(cookie["sonamu_token"].value)
        return any(hmac.compare_digest(value, self.token) for value in offered if value)


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, content_type: str, body: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", f"{content_type}; charset=utf-8".encode()),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _jsonable(run: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(run), default=str))
