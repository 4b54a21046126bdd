"""Sync views that start runs and read them through the process's one SyncClient.

    POST /invoices/                  {"order_id": 7, "email": "kim@example.com"} -> 202 {"id": ..., "created": ...}
    GET  /invoices/<id>/             -> {"id", "status", "output", "error"}
    GET  /invoices/<id>/result/?timeout=10   -> 200 output | 202 still going | 409 failed or canceled

The views only start and read runs; `manage.py sonamu_worker` executes them. A view blocks its own thread
only (SyncClient is thread-safe), so `result/` with a timeout holds one server thread for that long: keep
MAX_WAIT_S small, or have clients poll the status instead.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from sonamu_django.client import get_client

from sonamu_tasks import InvalidInput, InvalidValue, ResultTimeout, RunNotFound, WorkflowFailed

from .invoices_workflow import send_invoice

MAX_WAIT_S = 30.0


@csrf_exempt  # a JSON API for other services: authenticate it with your own scheme (a token, say)
@require_POST
def start_invoice(request: HttpRequest) -> JsonResponse:
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        return JsonResponse({"detail": "the body is not JSON"}, status=400)
    try:
        handle = get_client().run(send_invoice, body, idempotency_key=request.headers.get("Idempotency-Key"))
    except (InvalidInput, InvalidValue) as refused:  # the schema's verdict, or a bad idempotency key
        return JsonResponse({"detail": str(refused)}, status=400)
    return JsonResponse({"id": handle.id, "created": handle.created}, status=202)


@require_GET
def invoice_status(request: HttpRequest, run_id: uuid.UUID) -> JsonResponse:
    try:
        run = get_client().handle(str(run_id)).info()
    except RunNotFound as missing:
        return JsonResponse({"detail": str(missing)}, status=404)
    body = {"id": run.id, "status": run.status.value, "output": run.output, "error": _public(run.error)}
    return JsonResponse(body)


@require_GET
def invoice_result(request: HttpRequest, run_id: uuid.UUID) -> JsonResponse:
    try:
        timeout = min(max(float(request.GET.get("timeout", "0")), 0.0), MAX_WAIT_S)
    except ValueError:
        return JsonResponse({"detail": "timeout must be a number of seconds"}, status=400)
    try:
        output = get_client().handle(str(run_id)).result(timeout=timeout)
    except RunNotFound as missing:
        return JsonResponse({"detail": str(missing)}, status=404)
    except ResultTimeout as timed_out:
        return JsonResponse({"id": str(run_id), "status": timed_out.status}, status=202)
    except WorkflowFailed as failed:
        return JsonResponse({"id": str(run_id), "status": failed.status, "error": _public(failed.error)}, status=409)
    return JsonResponse({"id": str(run_id), "status": "completed", "output": output})


def _public(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored error without its traceback (that stays for operators: `sonamu-tasks show`, the dashboard)."""
    return None if not error else {key: error[key] for key in ("type", "message", "step") if key in error}
