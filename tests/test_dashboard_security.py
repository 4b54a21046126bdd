"""The dashboard's defences, each against the request that would get through without it.

The app is driven in-process (httpx over ASGI) against a real database; the browser test in
test_dashboard.py shows the same app still works for a person in Chromium.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from sonamu_tasks import NonRetryableError, RunStatus, workflow
from sonamu_tasks.cli import main
from sonamu_tasks.dashboard import Dashboard
from sonamu_tasks.errors import ConfigError

BASE = "http://127.0.0.1:8765"
RUN_ID_SHAPED_DASHES = "-" * 36


@workflow(version="1")
async def echo(input: Any) -> Any:
    return input


@workflow(version="1")
async def approval(step: Any) -> Any:
    return await step.receive("wait-approval", topic="approval", timeout="1h")


@workflow(version="1")
async def big_output(input: int) -> str:
    return "x" * input


@workflow(version="1")
async def loud_failure(input: int) -> None:
    raise NonRetryableError("boom " + "y" * input)


@asynccontextmanager
async def dashboard(make_config: Any, **options: Any) -> AsyncIterator[tuple[Dashboard, httpx.AsyncClient]]:
    """The app with its manager started, and a client that talks to it in-process as 127.0.0.1:8765."""
    app = Dashboard(make_config(enable_worker=False), **options)
    await app.manager.start()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield app, client
    finally:
        await app.manager.stop()


@pytest.fixture
def open_dashboard(make_config: Any) -> Callable[..., Any]:
    return lambda **options: dashboard(make_config, **options)


# Host allow-list (DNS rebinding)


async def test_a_foreign_host_header_is_refused(open_dashboard: Any) -> None:
    """A page on attacker.example whose name was rebound to 127.0.0.1 reaches the port but sends its own Host."""
    async with open_dashboard() as (_, client):
        for host in ("attacker.example", "attacker.example:8765", "127.0.0.1.nip.io:8765", "localhost.evil:8765"):
            response = await client.get("/", headers={"Host": host})
            assert response.status_code == 400, host
        for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765"):
            assert (await client.get("/", headers={"Host": host})).status_code == 200, host


async def test_the_host_must_carry_the_port_the_dashboard_listens_on(open_dashboard: Any) -> None:
    async with open_dashboard(port=8765) as (_, client):
        assert (await client.get("/", headers={"Host": "localhost:8765"})).status_code == 200
        assert (await client.get("/", headers={"Host": "localhost:9999"})).status_code == 400


async def test_a_dashboard_started_on_a_name_answers_to_that_name_and_the_allowed_ones(open_dashboard: Any) -> None:
    bearer = {"Authorization": "Bearer s3cret"}
    options = {"host": "dash.internal", "port": 8765, "token": "s3cret", "allowed_hosts": ["proxy.example"]}
    async with open_dashboard(**options) as (_, client):
        assert (await client.get("/", headers={**bearer, "Host": "dash.internal:8765"})).status_code == 200
        assert (await client.get("/", headers={**bearer, "Host": "proxy.example"})).status_code == 200
        assert (await client.get("/", headers={**bearer, "Host": "other.internal:8765"})).status_code == 400


# Origin check on POST


async def test_a_post_from_another_origin_is_refused(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    later = await manager.run(echo, 1, start_at="1h")
    async with open_dashboard() as (app, client):
        form = {"csrf": app.csrf}
        path = f"/runs/{later.id}/cancel"
        for headers in (
            {"Origin": "http://attacker.example"},
            {"Origin": "null"},
            {"Origin": "http://127.0.0.1:9999"},
            {"Referer": "http://attacker.example/page"},
            {},  # neither Origin nor Referer
        ):
            response = await client.post(path, data=form, headers=headers)
            assert response.status_code == 403, headers
        assert await later.status() is RunStatus.PENDING

        by_referer = await client.post(path, data=form, headers={"Referer": f"{BASE}/runs/{later.id}"})
        assert by_referer.status_code == 303
        assert await later.status() is RunStatus.CANCELED
        by_origin = await client.post(f"/runs/{later.id}/retry", data=form, headers={"Origin": BASE})
        assert by_origin.status_code == 303 and by_origin.headers["location"] == f"/runs/{later.id}"


# Headers on every response


async def test_every_response_forbids_framing_and_inline_script(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    done = await manager.run(echo, {"a": 1})
    await done.result(timeout=15)
    async with open_dashboard() as (_, client):
        responses = [
            await client.get("/"),
            await client.get(f"/runs/{done.id}"),
            await client.get(f"/api/runs/{done.id}"),
            await client.get("/no/such/page"),
            await client.get("/", headers={"Host": "attacker.example"}),
            await client.post(f"/runs/{done.id}/cancel", data={"csrf": "x"}),
        ]
        for response in responses:
            where = f"{response.request.url} -> {response.status_code}"
            assert response.headers.get("x-frame-options") == "DENY", where
            assert response.headers.get("x-content-type-options") == "nosniff", where
            policy = response.headers.get("content-security-policy", "")
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, where
            assert "unsafe-inline" not in policy, where
        page = responses[1].text
        assert "<style" not in page
        assert page.count("<script") == page.count("<script src=") == 1  # the live refresh, loaded from /static
        assert (await client.get("/static/live.js")).status_code == 200


# Body limit


@pytest.mark.parametrize("sent", ["with-content-length", "chunked"])
async def test_a_body_over_64_kb_is_refused_with_413(manager_for: Any, open_dashboard: Any, sent: str) -> None:
    """Sent in chunks (no Content-Length) it was a 500: the guard refused it from inside the app."""
    manager = await manager_for([echo])
    later = await manager.run(echo, 1, start_at="1h")
    async with open_dashboard() as (app, client):
        body = f"csrf={app.csrf}&pad=" + "z" * 70_000
        response = await client.post(
            f"/runs/{later.id}/cancel",
            content=_sent(body, sent),
            headers={"Origin": BASE, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 413
        assert response.text == "request body over 65536 bytes"
        assert await later.status() is RunStatus.PENDING


async def test_a_chunked_body_under_the_limit_reaches_the_form(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    later = await manager.run(echo, 1, start_at="1h")
    async with open_dashboard() as (app, client):
        body = f"csrf={app.csrf}&pad=" + "z" * 60_000
        response = await client.post(
            f"/runs/{later.id}/cancel",
            content=_sent(body, "chunked"),
            headers={"Origin": BASE, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 303
        assert await later.status() is RunStatus.CANCELED


def _sent(body: str, how: str) -> Any:
    """`body` as httpx sends it: whole with a Content-Length, or from a generator, in 8 kB chunks without one."""
    data = body.encode()
    if how != "chunked":
        return data

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 8192):
            yield data[at : at + 8192]

    return chunks()


# Malformed parameters: a 4xx, never a 500


@pytest.mark.parametrize(
    "path",
    [
        "/?limit=-1",
        "/?limit=abc",
        "/?limit=100000",
        "/api/runs?limit=0",
        "/?cursor=junk",
        "/api/runs?cursor=junk",
        "/?workflow=%00",
        "/api/runs?workflow=a%00b",
        "/?status=bogus",
        "/api/runs?status=COMPLETED%00",
        "/?parent=junk",
        "/api/runs?parent=%00",
        "/?version=%00",
        "/api/runs?version=%20",
        "/api/runs?version=" + "v" * 300,
        f"/?parent={RUN_ID_SHAPED_DASHES}",  # PostgreSQL would refuse it as a uuid: a 400 before the query
        f"/runs/{RUN_ID_SHAPED_DASHES}",
        f"/api/runs/{RUN_ID_SHAPED_DASHES}",  # the old route took 36 of [0-9a-f-]; PostgreSQL refused it
    ],
)
async def test_a_malformed_query_or_run_id_is_a_client_error(open_dashboard: Any, path: str) -> None:
    async with open_dashboard() as (_, client):
        response = await client.get(path)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)


FORM = {"Origin": BASE, "Content-Type": "application/x-www-form-urlencoded"}


async def test_a_non_ascii_csrf_value_is_refused_not_a_crash(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    later = await manager.run(echo, 1, start_at="1h")
    async with open_dashboard() as (_, client):
        response = await client.post(f"/runs/{later.id}/cancel", content=b"csrf=%C3%A9t%C3%A9", headers=FORM)
    assert response.status_code == 403
    assert await later.status() is RunStatus.PENDING


async def test_a_form_that_is_not_utf8_is_a_400(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    later = await manager.run(echo, 1, start_at="1h")
    async with open_dashboard() as (app, client):
        body = f"csrf={app.csrf}&note=".encode() + b"\xff\xfe%FF"
        response = await client.post(f"/runs/{later.id}/cancel", content=body, headers=FORM)
    assert response.status_code == 400
    assert await later.status() is RunStatus.PENDING


async def test_a_post_to_a_run_id_of_dashes_is_a_404(open_dashboard: Any) -> None:
    async with open_dashboard() as (app, client):
        response = await client.post(f"/runs/{RUN_ID_SHAPED_DASHES}/cancel", data={"csrf": app.csrf}, headers=FORM)
    assert response.status_code == 404


# Large values and live refresh


async def test_a_50_mb_output_is_cut_on_the_run_page_and_whole_in_the_json(
    manager_for: Any, open_dashboard: Any
) -> None:
    manager = await manager_for([big_output])
    size = 50 * 1024 * 1024
    done = await manager.run(big_output, size)
    await done.result(timeout=60)
    async with open_dashboard() as (_, client):
        page = await client.get(f"/runs/{done.id}")
        assert page.status_code == 200
        assert len(page.content) < 100_000
        assert f"href='/api/runs/{done.id}'" in page.text
        whole = await client.get(f"/api/runs/{done.id}")
        assert len(whole.json()["output"]) == size


async def test_a_long_error_is_cut_on_the_run_page(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([loud_failure])
    failed = await manager.run(loud_failure, 500_000)
    info = await manager.wait_until_finished(failed.id, timeout=30)
    assert info.status is RunStatus.FAILED
    async with open_dashboard() as (_, client):
        page = await client.get(f"/runs/{failed.id}")
    assert page.status_code == 200 and "boom yyy" in page.text
    assert len(page.content) < 100_000
    assert f"href='/api/runs/{failed.id}'" in page.text


def spoofing_step() -> None:
    raise NonRetryableError("card \u202edeniled\x1b[2J ok")


@workflow(version="1")
async def spoofing_failure(step: Any) -> None:
    await step.define("charge\u202eevil", spoofing_step).run()


async def test_a_bidi_override_or_escape_in_an_error_or_a_step_name_is_shown_escaped(
    manager_for: Any, open_dashboard: Any
) -> None:
    """U+202E reverses what follows it on the line and ESC starts a terminal sequence: printed raw, an error
    message or a step name could make the page read other than what is stored. They show as the value previews
    show them (\\u202e), as `sonamu-tasks show` prints them."""
    manager = await manager_for([spoofing_failure])
    failed = await manager.run(spoofing_failure)
    assert (await manager.wait_until_finished(failed.id, timeout=30)).status is RunStatus.FAILED
    async with open_dashboard() as (_, client):
        page = (await client.get(f"/runs/{failed.id}")).text
    shown = re.sub(r"'[^']*'|\"[^\"]*\"", "", page)  # attribute values out: escaped text holds no quote
    assert "\u202e" not in shown and "\x1b" not in shown
    error = page.split("<h3>Error")[1]
    assert error.startswith(" in step charge\\u202eevil</h3>")
    assert "NonRetryableError: card \\u202edeniled\\u001b[2J ok</p>" in error
    traceback = error.split("<pre>")[1].split("</pre>")[0]
    assert "\n" in traceback and "card \\u202edeniled\\u001b[2J ok" in traceback  # lines kept, the rest escaped
    assert "<tr><td>charge\\u202eevil</td>" in page  # the steps table
    assert "value='charge\u202eevil'" in page  # the fork button sends the name back as it is stored


async def test_a_run_page_refreshes_only_while_the_run_is_unfinished(manager_for: Any, open_dashboard: Any) -> None:
    manager = await manager_for([echo])
    done = await manager.run(echo, 1)
    await done.result(timeout=15)
    later = await manager.run(echo, 2, start_at="1h")
    async with open_dashboard() as (_, client):
        finished = (await client.get(f"/runs/{done.id}")).text
        assert "setInterval" not in finished and "data-refresh-ms" not in finished
        assert "data-finished" in (await client.get(f"/runs/{done.id}", headers={"X-Partial": "1"})).text
        unfinished = (await client.get(f"/runs/{later.id}")).text
        assert "data-refresh-ms='1000'" in unfinished and "data-finished" not in unfinished


# Token


async def test_the_token_is_accepted_only_as_a_bearer_header(open_dashboard: Any) -> None:
    async with open_dashboard(token="s3cret") as (_, client):
        assert (await client.get("/")).status_code == 401
        assert (await client.get("/", headers={"Authorization": "s3cret"})).status_code == 401
        assert (await client.get("/", headers={"Authorization": "Basic s3cret"})).status_code == 401
        assert (await client.get("/", headers={"Authorization": "Bearer s3cre"})).status_code == 401
        assert (await client.get("/", headers={"Authorization": "Bearer s3cret"})).status_code == 200


async def test_the_token_link_sets_a_cookie_and_drops_the_token_from_the_address(open_dashboard: Any) -> None:
    async with open_dashboard(token="s3cret") as (_, client):
        login = await client.get("/?status=failed&token=s3cret")
        assert login.status_code == 303 and login.headers["location"] == "/?status=failed"
        cookie = login.headers["set-cookie"]
        assert "s3cret" not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert (await client.get("/workers")).status_code == 200  # the client kept the cookie
        client.cookies.clear()
        assert (await client.get("/workers")).status_code == 401


async def test_a_non_ascii_token_is_refused_not_a_crash(open_dashboard: Any) -> None:
    async with open_dashboard(token="s3cret") as (_, client):
        assert (await client.get("/?token=%C3%A9t%C3%A9")).status_code == 401
        assert (
            await client.get("/", headers={"Authorization": "Bearer \xe9t\xe9".encode("latin-1")})
        ).status_code == 401
        assert (await client.get("/", headers={"Cookie": "sonamu_token=\xe9".encode("latin-1")})).status_code == 401


@pytest.mark.parametrize("token", ["", "   ", "\t\n"])
def test_an_empty_or_blank_token_is_refused_at_start_up(make_config: Any, token: str) -> None:
    with pytest.raises(ConfigError, match="empty or only spaces"):
        Dashboard(make_config(enable_worker=False), token=token)


@pytest.fixture
def cli_dashboard(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Callable[..., Any]:
    """`sonamu-tasks dashboard ...` with uvicorn.run replaced: what it would serve and what it printed."""
    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append({"app": app, **options}))
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> tuple[Any, list[dict[str, Any]]]:
        env = {"SONAMU_TASKS_DATABASE_URL": f"sqlite:///{tmp_path / 'dash.db'}", "SONAMU_TASKS_DASHBOARD_TOKEN": ""}
        result = CliRunner().invoke(main, ["dashboard", *args], env=env)
        return result, served

    return invoke


def test_the_token_is_never_printed_nor_logged(cli_dashboard: Any) -> None:
    result, served = cli_dashboard("--host", "0.0.0.0", "--token", "s3cret-value")
    assert result.exit_code == 0, result.output
    assert "s3cret-value" not in result.output
    assert "http://0.0.0.0:8765/" in result.output
    assert served and served[0]["access_log"] is False  # a first visit's ?token= would be in the access log


@pytest.mark.parametrize("token", ["", "  "])
def test_the_command_refuses_a_blank_token(cli_dashboard: Any, token: str) -> None:
    result, served = cli_dashboard("--token", token)
    assert result.exit_code == 1 and "empty or only spaces" in result.output and not served


def test_loopback_is_decided_by_the_address_not_its_spelling(cli_dashboard: Any) -> None:
    for host in ("127.0.0.1.nip.io", "127.attacker.example", "localhost.example", "0.0.0.0"):
        result, served = cli_dashboard("--host", host)
        assert result.exit_code == 1 and "pass --token" in result.output, host
    assert not served
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"):
        result, served = cli_dashboard("--host", host)
        assert result.exit_code == 0, (host, result.output)
    assert [options["host"] for options in served] == ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"]


# The message form


BAD_MESSAGES = [
    ({"topic": ""}, 400, "topic: missing"),
    ({"topic": "   "}, 400, "topic: topic must not be blank"),
    ({"topic": "a\x00b"}, 400, "topic: topic holds the character"),
    ({"topic": "t" * 300}, 400, "topic: topic is 300 characters long; the limit is 255"),
    ({"message": ""}, 400, "message: missing"),
    ({"message": "{approved: true}"}, 400, "message: not valid JSON"),
    ({"message": "NaN"}, 400, "message: the value cannot be stored as JSON"),
    ({"message": '"\\u0000"'}, 400, "holds NUL"),
    ({"message": "[" * 100_000}, 413, "request body over"),
    ({"message": "[" * 20_000}, 400, "message: not storable JSON: nested too deeply"),
    ({"idempotency_key": "k" * 300}, 400, "idempotency_key: idempotency_key is 300 characters long"),
    ({"csrf": ""}, 403, "bad or missing form token"),
    ({"csrf": "forged"}, 403, "bad or missing form token"),
]


@pytest.mark.parametrize(("change", "status", "says"), BAD_MESSAGES, ids=[says for _, _, says in BAD_MESSAGES])
async def test_a_bad_message_form_is_a_4xx_that_says_why_and_sends_nothing(
    manager_for: Any, open_dashboard: Any, change: dict[str, str], status: int, says: str
) -> None:
    manager = await manager_for([approval])
    waiting = await manager.run(approval, start_at="1h")  # not started: nothing consumes what would arrive
    async with open_dashboard() as (app, client):
        form = {"csrf": app.csrf, "topic": "approval", "message": '{"approved": true}', **change}
        response = await client.post(f"/runs/{waiting.id}/send", data=form, headers={"Origin": BASE})
    assert response.status_code == status, response.text
    assert says in response.text and "Traceback" not in response.text
    assert await manager.list_messages(waiting.id) == []


async def test_the_message_form_refuses_other_origins_unknown_runs_and_bad_encodings(
    manager_for: Any, open_dashboard: Any
) -> None:
    manager = await manager_for([approval])
    waiting = await manager.run(approval, start_at="1h")
    async with open_dashboard() as (app, client):
        form = {"csrf": app.csrf, "topic": "approval", "message": "1"}
        path = f"/runs/{waiting.id}/send"
        for headers in ({"Origin": "http://attacker.example"}, {"Referer": "http://attacker.example/"}, {}):
            assert (await client.post(path, data=form, headers=headers)).status_code == 403, headers
        unknown = await client.post("/runs/0190b7e2-5c3a-7d1e-8f00-1234567890ab/send", data=form, headers=FORM)
        assert unknown.status_code == 404 and "no run with id" in unknown.text
        dashes = await client.post(f"/runs/{RUN_ID_SHAPED_DASHES}/send", data=form, headers=FORM)
        assert dashes.status_code == 404
        not_utf8 = f"csrf={app.csrf}&topic=approval&message=".encode() + b"\xff\xfe"
        assert (await client.post(path, content=not_utf8, headers=FORM)).status_code == 400
        assert await manager.list_messages(waiting.id) == []

        sent = await client.post(path, data=form, headers=FORM)
        assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{waiting.id}?sent=1"
        [message] = await manager.list_messages(waiting.id)
        assert (message.topic, message.payload, message.idempotency_key) == ("approval", 1, None)


# The fork form


async def test_the_fork_form_goes_through_every_guard_and_forks_nothing_when_refused(
    manager_for: Any, open_dashboard: Any
) -> None:
    manager = await manager_for([echo])
    done = await manager.run(echo, {"a": 1})
    await done.result(timeout=15)
    assert (await manager.get_run(done.id, with_steps=True)).steps == ()  # `echo` has no steps to fork from
    async with open_dashboard() as (app, client):
        path = f"/runs/{done.id}/fork"
        form = {"csrf": app.csrf, "from_step": "anything", "version": "1"}
        for headers in ({"Origin": "http://attacker.example"}, {"Referer": "http://attacker.example/"}, {}):
            assert (await client.post(path, data=form, headers=headers)).status_code == 403, headers
        assert (await client.post(path, data={**form, "csrf": "forged"}, headers=FORM)).status_code == 403
        assert (await client.post(path, data={**form, "csrf": ""}, headers=FORM)).status_code == 403
        too_big = await client.post(path, content=f"csrf={app.csrf}&from_step=" + "s" * 70_000, headers=FORM)
        assert too_big.status_code == 413
        foreign_host = await client.post(path, data=form, headers={**FORM, "Host": "attacker.example"})
        assert foreign_host.status_code == 400
        not_utf8 = f"csrf={app.csrf}&from_step=".encode() + b"\xff\xfe"
        assert (await client.post(path, content=not_utf8, headers=FORM)).status_code == 400
        assert (await client.post(f"/runs/{RUN_ID_SHAPED_DASHES}/fork", data=form, headers=FORM)).status_code == 404
        assert (await client.get(path)).status_code == 405  # a link cannot fork
        no_step = await client.post(path, data=form, headers=FORM)  # through every guard: the run has no such step
        assert no_step.status_code == 400 and "has no step 'anything' to fork from; its steps: none" in no_step.text
    assert [run.id for run in (await manager.list_runs()).items] == [done.id]  # nothing was created
