"""Dashboard: a Starlette app over a WorkflowManager that runs no worker.

    GET  /                    runs, newest first, filters (workflow, version, status, parent), live refresh;
                              a warning when some versions' unfinished runs have no live worker (stranded)
    GET  /runs/{id}           a run: status, parent and children, what it waits for, step timeline, steps (each
                              with "Fork from here"), unconsumed messages, published events, input, output or
                              error; cancel, pause / resume, retry; a form to send it a message while it is
                              unfinished
    POST /runs/{id}/cancel    (and /pause, /resume, /retry) then back to the run page, which says so when the
                              action did nothing (`?not_steered=retry&status=completed`)
    POST /runs/{id}/send      a message (topic, JSON, optional idempotency key), then back to the run page
    POST /runs/{id}/fork      a fork from a step (from_step, optional version), then to the new run's page
    GET  /queues              each queue: its limits, runs executing, due backlog and its age, the rate window
                              used, runs parked behind a full concurrency key
    GET  /workers, /schedules
    POST /schedules/delete    a schedule no live worker fires (its workflow left the code), then back to the list
    GET  /api/runs, /api/runs/{id}   the same as JSON, as `runs --json` and `show --json` (the run in full: a
                              page cuts long values)
    GET  /api/queues          the queues as JSON (as `sonamu-tasks queues --json`)
    GET  /api/stranded        unfinished runs per (workflow, version) that no live worker registers
    GET  /metrics             this process's Prometheus metrics (needs the `metrics` extra; 404 without it)

Read-only (`read_only=True`, `sonamu-tasks dashboard --read-only`): its manager starts read-only (it checks the
schema instead of migrating it, and writes nothing), its pages have no button or form that acts, and every
action's address answers 405 without reading the form or the database: it runs with credentials that may only
read.

Security (guards.py): answers only to the Host names it was started for, refuses cross-origin POSTs, sends
a strict Content-Security-Policy, caps request bodies. With a token (required to listen beyond loopback),
every request carries `Authorization: Bearer <token>` or the cookie set by opening it once with `?token=`.
Forms carry a per-process CSRF value.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import arguments, telemetry
from ..config import Config
from ..display import (
    COUNTED_MESSAGES,
    NO_VALUES,
    children_of,
    messages_of,
    not_steered,
    queue_summary,
    stranded_summary,
)
from ..errors import BackendUnavailable, ConfigError, RunNotFound, SonamuTasksError
from ..manager import RunPage, WorkflowManager
from ..records import STALE_AFTER, RunRecord, served_workflows
from ..run_json import run_detail, run_summary
from . import pages
from .guards import (
    BodyLimit,
    HostAllowList,
    HostRule,
    OriginCheck,
    SecurityHeaders,
    TokenGate,
    allowed_hosts,
    is_loopback,
    same_secret,
)

T = TypeVar("T")
MAX_BODY = 64 * 1024  # a form holds one short field; nothing the dashboard accepts comes near this
QUEUES_REFRESH_MS = 2000  # the queues page counts each queue's unfinished runs: every 2 s, not every second
_STATIC = {
    "dashboard.css": ("text/css", files(__package__).joinpath("static/dashboard.css").read_text()),
    "live.js": ("text/javascript", files(__package__).joinpath("static/live.js").read_text()),
}


class Dashboard:
    """The ASGI app. `host` and `port` are where it listens: they decide which Host headers it answers
    (loopback names, and `host` itself unless it is a wildcard; `port=None` allows any port) and whether a
    token is required (any `host` that is not loopback). `allowed_hosts` adds names it is reached by, such as
    a proxy's or the machine's name when listening on 0.0.0.0 (`name` for any port, `name:port`). `read_only`:
    a dashboard that only reads (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        allowed_hosts: Iterable[str] = (),
        read_only: bool = False,
    ) -> None:
        check_token(token, host)
        config = dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, enable_worker=False))
        self.manager = WorkflowManager(config, read_only=read_only)
        self.read_only = read_only
        self.csrf = secrets.token_urlsafe(16)
        # The token the pages' forms carry; None: pages without forms.
        self._form_token = None if read_only else self.csrf
        self.host_rules = _host_rules(host, port, allowed_hosts)
        routes = [
            Route("/", self.runs_page),
            Route("/api/runs", self.runs_json),
            Route("/runs/{run_id}", self.run_page),
            Route("/api/runs/{run_id}", self.run_json),
            Route("/api/stranded", self.stranded_json),
            Route("/queues", self.queues_page),
            Route("/api/queues", self.queues_json),
            Route("/workers", self.workers_page),
            Route("/schedules", self.schedules_page),
            Route("/metrics", self.metrics),
            Route("/static/{name}", self.static),
        ]
        if read_only:
            # Every action's address answers that nothing is changed here.
            actions = ("/runs/{run_id}/{action:str}", "/schedules/delete")
            routes += [Route(path, _read_only, methods=["POST"]) for path in actions]
        else:
            routes += [
                Route("/runs/{run_id}/send", self.send, methods=["POST"]),
                Route("/runs/{run_id}/fork", self.fork, methods=["POST"]),
                Route("/runs/{run_id}/{action:str}", self.steer, methods=["POST"]),
                Route("/schedules/delete", self.delete_schedule, methods=["POST"]),
            ]
        self.app = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={
                HTTPException: _http_error,
                RunNotFound: _not_found,
                BackendUnavailable: _unavailable,
                SonamuTasksError: _bad_request,
            },
        )
        inner: ASGIApp = OriginCheck(self.app)
        if token is not None:
            inner = TokenGate(inner, token)
        self._asgi = SecurityHeaders(HostAllowList(BodyLimit(inner, MAX_BODY), self.host_rules))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.manager.start()
        try:
            yield
        finally:
            await self.manager.stop()

    # pages and JSON

    async def runs_page(self, request: Request) -> Response:
        query = request.query_params
        page = await self._runs(request)
        shown = {key: value for key, value in query.items() if key != "cursor"}
        table = pages.runs_table(page.items, page.next_cursor, shown)
        if _partial(request):
            return HTMLResponse(table)
        parent = _parameter(query, "parent", arguments.run_id) or ""  # checked by _runs already: a run id
        version = query.get("version", "")  # checked by _runs already: a storable version, or empty
        filters = pages.runs_filters(query.get("workflow", ""), query.get("status", ""), parent, version)
        # Outside the part that refreshes every second: read once per page load, not once a second.
        banner = pages.stranded_banner(await self.manager.stranded_runs(stale_after=STALE_AFTER))
        return self._page("Runs", table, before=banner + filters)

    async def runs_json(self, request: Request) -> Response:
        page = await self._runs(request)
        return _json({"items": [run_summary(run) for run in page.items], "next_cursor": page.next_cursor})

    async def run_page(self, request: Request) -> Response:
        # Values longer than the page shows are cut by the database: a page refreshed every second never
        # reads a 50 MB output (the JSON view has the whole run).
        run = await self.manager.get_run(_run_id(request), with_steps=True, value_limit=pages.VALUE_LIMIT)
        detail = pages.run_detail(
            run,
            self._form_token,
            parent=await self._parent(run.parent_id),
            children=await children_of(self.manager, run),
            messages=await messages_of(self.manager, run.id),
            events=await self.manager.list_events(run.id),
        )
        if _partial(request):
            return HTMLResponse(detail)
        refresh = None if run.status.finished else 1000  # a finished run changes only when someone acts on it
        query = request.query_params
        notice = (
            pages.sent_notice(query.get("sent", ""))
            + pages.forked_notice(_notice_run_id(query.get("forked_from", "")), query.get("step", ""))
            + pages.not_steered_notice(run.id, query.get("not_steered", ""), query.get("status", ""))
        )
        form, before = "", notice
        if self._form_token is not None:
            form = "" if run.status.finished else pages.send_form(run, self._form_token)
            before += pages.fork_form(run, self._form_token)
        return self._page(f"Run {run.id}", detail, refresh_ms=refresh, before=before, after=form)

    async def run_json(self, request: Request) -> Response:
        """The run in full, as `show --json` has it (the same function builds both); but every message counted
        is listed whole (up to 100), where `show --json` lists the oldest 20."""
        run = await self.manager.get_run(_run_id(request), with_steps=True)
        detail = run_detail(
            run,
            parent=await self._parent(run.parent_id),
            children=await children_of(self.manager, run),
            messages=await messages_of(self.manager, run.id, listed=COUNTED_MESSAGES),
            events=await self.manager.list_events(run.id),
        )
        return _json(detail)

    async def stranded_json(self, request: Request) -> Response:
        groups = await self.manager.stranded_runs(stale_after=STALE_AFTER)
        return _json({"stale_after": STALE_AFTER, "groups": [stranded_summary(group) for group in groups]})

    async def steer(self, request: Request) -> Response:
        steering = {
            "cancel": self.manager.cancel,
            "retry": self.manager.retry,
            "pause": self.manager.pause,
            "resume": self.manager.resume,
        }
        name = request.path_params["action"]
        action = steering.get(name)
        if action is None:
            raise HTTPException(404, "not found")
        run_id = _run_id(request)
        await self._form(request)
        status = await action(run_id)
        # One that did nothing (a second operator's Retry of a run retried and finished since) says so on the
        # run page, or it would look done.
        if not_steered(name, run_id, status) is None:
            return RedirectResponse(f"/runs/{run_id}", status_code=303)
        query = urlencode({"not_steered": name, "status": status.value})
        return RedirectResponse(f"/runs/{run_id}?{query}", status_code=303)

    async def send(self, request: Request) -> Response:
        """The run page's message form: checked field by field (a bad one is a 400 naming it), then sent."""
        run_id = _run_id(request)
        form = await self._form(request)
        topic = _field(form, "topic", arguments.topic)
        message = _field(form, "message", arguments.json_value)
        key = _field(form, "idempotency_key", arguments.idempotency_key, required=False)
        stored = await self.manager.send(run_id, message, topic=topic, idempotency_key=key)
        return RedirectResponse(f"/runs/{run_id}?sent={'1' if stored else 'again'}", status_code=303)

    async def fork(self, request: Request) -> Response:
        """A step's "Fork from here": a new run from that step (on `version` if given), then its page. A step
        the run does not have is a 400 naming its steps (from the manager), an unknown run a 404."""
        run_id = _run_id(request)
        form = await self._form(request)
        from_step = _field(form, "from_step", arguments.step_name)
        version = _field(form, "version", arguments.version, required=False)
        assert from_step is not None  # required
        handle = await self.manager.fork(run_id, from_step, version)
        target = f"/runs/{handle.id}?{urlencode({'forked_from': run_id, 'step': from_step})}"
        return RedirectResponse(target, status_code=303)

    async def queues_page(self, request: Request) -> Response:
        body = pages.queues_table(await self.manager.queue_stats())
        if _partial(request):
            return HTMLResponse(body)
        return self._page("Queues", body, refresh_ms=QUEUES_REFRESH_MS)

    async def queues_json(self, request: Request) -> Response:
        return _json([queue_summary(stats) for stats in await self.manager.queue_stats()])

    async def workers_page(self, request: Request) -> Response:
        body = pages.workers_table(await self.manager.list_workers())
        return HTMLResponse(body) if _partial(request) else self._page("Workers", body)

    async def schedules_page(self, request: Request) -> Response:
        served = served_workflows(await self.manager.list_workers(), datetime.now(UTC))
        body = pages.schedules_table(await self.manager.list_schedules(), served, self._form_token)
        if _partial(request):
            return HTMLResponse(body)
        notice = pages.deleted_notice(request.query_params.get("deleted", ""))
        return self._page("Schedules", body, refresh_ms=5000, before=notice)

    async def delete_schedule(self, request: Request) -> Response:
        """A schedule's Delete: refused (400, saying why) for one a live worker fires."""
        form = await self._form(request)
        name = _field(form, "name", arguments.plain_text)
        assert name is not None  # required
        await self.manager.delete_schedule(name)
        return RedirectResponse(f"/schedules?{urlencode({'deleted': name})}", status_code=303)

    async def metrics(self, request: Request) -> Response:
        if not telemetry.metrics_available():
            raise HTTPException(404, "metrics need prometheus_client: pip install 'sonamu-tasks[metrics]'")
        body, content_type = await self.manager.metrics_text()
        return Response(body, media_type=content_type)

    async def static(self, request: Request) -> Response:
        found = _STATIC.get(request.path_params["name"])
        if found is None:
            raise HTTPException(404, "not found")
        media_type, text = found
        return Response(text, media_type=media_type)

    async def _runs(self, request: Request) -> RunPage:
        query = request.query_params
        workflow = _parameter(query, "workflow", arguments.plain_text)
        status = _parameter(query, "status", lambda text: arguments.statuses([text]))
        limit = _parameter(query, "limit", arguments.limit)
        cursor = _parameter(query, "cursor", arguments.run_id)
        parent = _parameter(query, "parent", arguments.run_id)
        version = _parameter(query, "version", arguments.version)
        # The list shows no value (nor does /api/runs): refreshed every second, it must not read 50 huge inputs.
        return await self.manager.list_runs(
            workflow=workflow,
            version=version,
            status=status,
            limit=limit or 50,
            cursor=cursor,
            parent_id=parent,
            value_limit=NO_VALUES,
        )

    def _page(
        self, title: str, body: str, *, refresh_ms: int | None = 1000, before: str = "", after: str = ""
    ) -> HTMLResponse:
        """A whole page (see pages.page), saying so when this dashboard only reads."""
        return HTMLResponse(
            pages.page(title, body, refresh_ms=refresh_ms, before=before, after=after, read_only=self.read_only)
        )

    async def _form(self, request: Request) -> dict[str, list[str]]:
        """A posted form's fields, once its CSRF value is checked (403 without the right one)."""
        try:
            form = parse_qs((await request.body()).decode("utf-8"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise HTTPException(400, "the form is not UTF-8") from None
        if not same_secret(form.get("csrf", [""])[0], self.csrf.encode()):
            raise HTTPException(403, "bad or missing form token; reload the page")
        return form

    async def _parent(self, run_id: str | None) -> RunRecord | None:
        if run_id is None:
            return None
        try:
            return await self.manager.get_run(run_id, value_limit=NO_VALUES)  # its name and status only
        except RunNotFound:
            return None  # deleted since (retention): the page still names its id


def check_token(token: str | None, host: str) -> None:
    """Refuse, at start-up, a token nobody should rely on, and no token where the network can reach it."""
    if token is not None and not token.strip():
        raise ConfigError("the dashboard token is empty or only spaces; give a real secret (openssl rand -hex 16)")
    if token is not None and not (token.isascii() and token.isprintable()):
        raise ConfigError("the dashboard token must be printable ASCII (it travels in an HTTP header)")
    if token is None and not is_loopback(host):
        raise ConfigError(f"listening on {host} exposes your runs: pass --token (or SONAMU_TASKS_DASHBOARD_TOKEN)")


def _host_rules(host: str, port: int | None, extra: Iterable[str]) -> tuple[HostRule, ...]:
    try:
        return allowed_hosts(host, port, extra)
    except ValueError as error:
        raise ConfigError(f"dashboard host: {error}") from error


def _parameter(query: QueryParams, name: str, check: Callable[[str], T]) -> T | None:
    """A query parameter through its check (absent or empty: None); a bad one is a 400 naming it."""
    text = query.get(name)
    if not text:
        return None
    try:
        return check(text)
    except ValueError as error:
        raise HTTPException(400, f"{name}: {error}") from None


def _field(form: dict[str, list[str]], name: str, check: Callable[[str], T], *, required: bool = True) -> T | None:
    """A form field through its check; a missing or bad one is a 400 naming it (an empty optional one: None)."""
    text = form.get(name, [""])[0]
    if not text:
        if required:
            raise HTTPException(400, f"{name}: missing; fill it in and send again")
        return None
    try:
        return check(text)
    except ValueError as error:
        raise HTTPException(400, f"{name}: {error}") from None


def _run_id(request: Request) -> str:
    try:
        return arguments.run_id(request.path_params["run_id"])
    except ValueError as error:
        raise HTTPException(404, str(error)) from None


def _notice_run_id(text: str) -> str | None:
    """The run a notice names (`?forked_from=`): a run id, or None (no notice) for anything else."""
    try:
        return arguments.run_id(text)
    except ValueError:
        return None


def _partial(request: Request) -> bool:
    return request.headers.get("x-partial") == "1"


def _json(value: Any) -> Response:
    return Response(json.dumps(value), media_type="application/json")


async def _read_only(request: Request) -> Response:
    """An action's address on a read-only dashboard: refused before the form or the database is read. `Allow`
    is empty: no method changes anything here."""
    return PlainTextResponse(
        "this dashboard is read-only: it cancels, pauses, resumes, retries, sends, forks and deletes nothing "
        "(use a dashboard started without --read-only, or the command line, with credentials that may write)",
        status_code=405,
        headers={"Allow": ""},
    )


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return PlainTextResponse(str(error.detail), status_code=error.status_code, headers=error.headers)


async def _not_found(request: Request, error: Exception) -> Response:
    return PlainTextResponse(str(error), status_code=404)


async def _bad_request(request: Request, error: Exception) -> Response:
    return PlainTextResponse(str(error), status_code=400)


async def _unavailable(request: Request, error: Exception) -> Response:
    return PlainTextResponse(f"the database is not answering: {error}", status_code=503)
