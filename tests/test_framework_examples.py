"""The web framework examples, each driven by its framework's own test client on the embedded SQLite default
(a file in the test's temporary directory).

FastAPI: the app's lifespan opens one manager; with the worker on, a run started through the API completes
on that manager's worker and its result is read back through the API; with it off, runs wait for the
documented worker command. Django: the test client runs in a subprocess of its own (Django's settings and app
registry are process-wide, so they stay out of this one), and `manage.py sonamu_worker`, a real process,
executes the runs its views start.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from examples.fastapi_app.main import create_app
from examples.fastapi_app.settings import make_config

REPO = Path(__file__).resolve().parents[1]
DJANGO_APP = REPO / "examples" / "django_app"
ORDER = {"item": "tea", "quantity": 2, "email": "kim@example.com"}
PAYMENT = {"transaction": "tx-1", "amount": 12.5}
T = TypeVar("T")


@pytest.fixture
def database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The embedded default, in this test's directory (the apps and their subprocesses read it from here)."""
    url = f"sqlite:///{tmp_path / 'sonamu_tasks.db'}"
    monkeypatch.setenv("SONAMU_TASKS_DATABASE_URL", url)
    return url


def until(condition: Callable[[], T], *, what: str, timeout: float = 15.0) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return value


# FastAPI


def test_fastapi_an_order_started_through_the_api_completes_on_the_apps_own_worker(database_url: str) -> None:
    app = create_app(make_config(run_worker=True, concurrency=2))
    with TestClient(app) as client:
        started = client.post("/orders", json=ORDER, headers={"Idempotency-Key": "order-1"})
        assert started.status_code == 202 and started.json()["created"] is True
        order_id = started.json()["id"]
        again = client.post("/orders", json=ORDER, headers={"Idempotency-Key": "order-1"})
        assert again.json() == {"id": order_id, "created": False}

        # The run reserves the stock and parks, waiting for the payment webhook.
        until(lambda: client.get(f"/orders/{order_id}").json()["status"] == "waiting", what="the run to wait")
        state = client.get(f"/orders/{order_id}/state").json()["state"]
        assert state == {"waiting_for": "payment", "reservation": "reservation-tea-2"}
        assert client.get(f"/orders/{order_id}/result", params={"timeout": 0}).status_code == 202

        paid = client.post(f"/orders/{order_id}/payment", json=PAYMENT, headers={"Idempotency-Key": "tx-1"})
        assert paid.status_code == 202 and paid.json()["delivered"] is True
        redelivered = client.post(f"/orders/{order_id}/payment", json=PAYMENT, headers={"Idempotency-Key": "tx-1"})
        assert redelivered.json()["delivered"] is False

        result = client.get(f"/orders/{order_id}/result", params={"timeout": 15})
        assert result.status_code == 200
        assert result.json()["output"] == {
            "status": "paid",
            "receipt": "receipt-tx-1",
            "reservation": "reservation-tea-2",
        }
        assert client.get(f"/orders/{order_id}").json()["status"] == "completed"


def test_fastapi_with_the_worker_off_runs_wait_for_the_documented_worker_command(database_url: str) -> None:
    app = create_app(make_config(run_worker=False))
    with TestClient(app) as client:
        order_id = client.post("/orders", json=ORDER).json()["id"]
        client.post(f"/orders/{order_id}/payment", json=PAYMENT)  # a message before the receive is kept
        pending = client.get(f"/orders/{order_id}/result", params={"timeout": 0.3})
        assert pending.status_code == 202 and pending.json()["status"] == "pending"  # no worker here

        command = [sys.executable, "-m", "sonamu_tasks", "--config", "examples.fastapi_app.settings:config", "worker"]
        with running(command, cwd=REPO) as worker:
            result = client.get(f"/orders/{order_id}/result", params={"timeout": 30})
            assert result.status_code == 200, (result.json(), worker.stop())
            assert result.json()["output"]["status"] == "paid"
        assert worker.process.returncode == 0, worker.output


def test_fastapi_unknown_runs_and_bad_input_are_client_errors(database_url: str) -> None:
    unknown = "0190f1f4-0000-7000-8000-000000000000"
    with TestClient(create_app(make_config(run_worker=False))) as client:
        assert client.get(f"/orders/{unknown}").status_code == 404
        assert client.get(f"/orders/{unknown}/result").status_code == 404
        assert client.post(f"/orders/{unknown}/payment", json=PAYMENT).status_code == 404
        assert client.get("/orders/not-a-uuid").status_code == 422
        refused = client.post("/orders", json={**ORDER, "quantity": 0})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "quantity"]


# Django

# A Django test client in a process of its own: one request per line on stdin ([method, path, data,
# headers]), one answer per line on stdout ([status, body]: JSON, or the text of any other body).
_DJANGO_CLIENT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["DJANGO_SETTINGS_MODULE"] = "invoicing_site.settings"
import django
django.setup()
from django.test import Client
client = Client()
for line in sys.stdin:
    method, path, data, headers = json.loads(line)
    if method == "POST":
        response = client.post(path, data, content_type="application/json", headers=headers)
    else:
        response = client.get(path, data, headers=headers)
    is_json = response.get("Content-Type") == "application/json"
    print(json.dumps([response.status_code, response.json() if is_json else response.content.decode()]), flush=True)
"""


class DjangoClient:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def request(
        self, method: str, path: str, data: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([method, path, data, headers or {}]) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the Django client exited: {self.process.stderr and self.process.stderr.read()}"
        status, body = json.loads(answer)
        return status, body


@contextmanager
def django_client(cwd: Path) -> Iterator[DjangoClient]:
    process = subprocess.Popen(
        [sys.executable, "-c", _DJANGO_CLIENT, str(DJANGO_APP)],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield DjangoClient(process)
    finally:
        _, errors = process.communicate(timeout=30)  # closes stdin: the client exits, its SyncClient closed
    assert process.returncode == 0, errors
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors


def test_django_views_start_runs_that_the_sonamu_worker_command_completes(database_url: str, tmp_path: Path) -> None:
    invoice = {"order_id": 7, "email": "kim@example.com"}
    with django_client(tmp_path) as client:
        status, started = client.request("POST", "/invoices/", invoice, {"Idempotency-Key": "invoice-7"})
        assert status == 202 and started["created"] is True
        run_id = started["id"]
        assert client.request("POST", "/invoices/", invoice, {"Idempotency-Key": "invoice-7"}) == (
            202,
            {"id": run_id, "created": False},
        )
        assert client.request("GET", f"/invoices/{run_id}/")[1]["status"] == "pending"  # no worker yet
        assert client.request("GET", f"/invoices/{run_id}/result/", {"timeout": "0.2"}) == (
            202,
            {"id": run_id, "status": "pending"},
        )

        command = [sys.executable, str(DJANGO_APP / "manage.py"), "sonamu_worker", "--concurrency", "2"]
        with running(command, cwd=tmp_path) as worker:
            status, result = client.request("GET", f"/invoices/{run_id}/result/", {"timeout": "30"})
            assert status == 200, (result, worker.stop())
            assert result["output"] == {"invoice": "INV-000007", "delivery": "sent INV-000007 to kim@example.com"}
            assert client.request("GET", f"/invoices/{run_id}/")[1]["status"] == "completed"
        assert worker.process.returncode == 0, worker.output
        assert "workflows send_invoice@1" in worker.output and "sonamu worker: stopped" in worker.output


def test_django_views_refuse_bad_input_and_unknown_runs(database_url: str, tmp_path: Path) -> None:
    with django_client(tmp_path) as client:
        status, refused = client.request("POST", "/invoices/", {"order_id": 0, "email": "kim@example.com"})
        assert status == 400 and "order_id: Input should be greater than 0" in refused["detail"]
        assert client.request("GET", "/invoices/0190f1f4-0000-7000-8000-000000000000/")[0] == 404
        assert client.request("GET", "/invoices/0190f1f4-0000-7000-8000-000000000000/result/")[0] == 404
        assert client.request("GET", "/invoices/not-a-uuid/")[0] == 404


# processes


@dataclass
class Running:
    process: subprocess.Popen[str]
    output: str = ""

    def stop(self) -> str:
        """SIGTERM, then wait for the graceful exit (30 s at most); returns what the process printed."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.output, _ = self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.output, _ = self.process.communicate()
        return self.output


@contextmanager
def running(command: list[str], *, cwd: Path) -> Iterator[Running]:
    """A process started with this test's environment, stopped with SIGTERM when the block ends."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = Running(process)
    try:
        yield started
    finally:
        started.stop()
