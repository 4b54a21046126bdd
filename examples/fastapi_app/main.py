"""FastAPI and sonamu-tasks: one WorkflowManager per process, opened by the lifespan, handed to handlers by
the `get_manager` dependency.

    uvicorn examples.fastapi_app.main:app                  # from the repository root; one worker in-process
    ORDERS_RUN_WORKER=0 uvicorn examples.fastapi_app.main:app --workers 4        # web processes only ...
    sonamu-tasks --config examples.fastapi_app.settings:config worker            # ... and a worker apart

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"item": "tea", "quantity": 2, "email": "kim@example.com"}'           # -> {"id": ...}
    curl -X POST localhost:8000/orders/ID/payment -H 'content-type: application/json' \\
         -d '{"transaction": "tx-1", "amount": 12.5}'                              # the provider's webhook
    curl 'localhost:8000/orders/ID/result?timeout=10'                               # waits up to 10 s

Every uvicorn worker process runs the lifespan, so each has its own manager (and, with ORDERS_RUN_WORKER=1,
its own worker; they share the runs through the database).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from sonamu_tasks import Config, ResultTimeout, RunNotFound, WorkflowFailed, WorkflowManager

from . import settings
from .orders_workflow import PAYMENT_TOPIC, Order, Payment, place_order

MAX_WAIT_S = 30.0
"""The longest GET /orders/{id}/result holds a request open."""


def create_app(config: Config | None = None) -> FastAPI:
    """The application; `config` defaults to the one settings.py reads from the environment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Migrates, discovers the workflows and (when enabled) starts the worker; on shutdown the worker
        # stops claiming, lets running steps finish and hands back the rest.
        async with WorkflowManager(config or settings.config) as manager:
            app.state.manager = manager
            yield

    app = FastAPI(title="orders (sonamu-tasks example)", lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(RunNotFound, _run_not_found)
    return app


def get_manager(request: Request) -> WorkflowManager:
    """The dependency: this process's manager, opened by the lifespan."""
    manager: WorkflowManager = request.app.state.manager
    return manager


Manager = Annotated[WorkflowManager, Depends(get_manager)]
router = APIRouter()


@router.post("/orders", status_code=202)
async def start_order(
    order: Order, manager: Manager, idempotency_key: Annotated[str | None, Header(max_length=255)] = None
) -> dict[str, Any]:
    """Start a run of place_order; a repeated Idempotency-Key returns the run it started before."""
    handle = await manager.run(place_order, order, idempotency_key=idempotency_key)
    return {"id": handle.id, "created": handle.created}


@router.get("/orders/{order_id}")
async def read_order(order_id: uuid.UUID, manager: Manager) -> dict[str, Any]:
    """The run as stored: its status, and its output or error once it has finished."""
    run = await manager.get_run(str(order_id))
    return {"id": run.id, "status": run.status.value, "output": run.output, "error": _public(run.error)}


@router.get("/orders/{order_id}/state")
async def read_order_state(order_id: uuid.UUID, manager: Manager) -> dict[str, Any]:
    """What the run published with step.set_event("state", ...) (null until it has)."""
    await manager.get_run(str(order_id))  # 404 for an unknown run
    return {"id": str(order_id), "state": await manager.get_event(str(order_id), "state", timeout=0)}


@router.get("/orders/{order_id}/result", responses={202: {"description": "not finished within the timeout"}})
async def order_result(
    order_id: uuid.UUID, manager: Manager, timeout: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0
) -> Any:
    """Wait up to `timeout` seconds for the run to finish: 200 with its output, 409 if it failed or was
    canceled, 202 with its status if it is still going."""
    try:
        output = await manager.wait_for_result(str(order_id), timeout=timeout)
    except ResultTimeout as timed_out:
        return JSONResponse({"id": str(order_id), "status": timed_out.status}, status_code=202)
    except WorkflowFailed as failed:
        detail = {"id": str(order_id), "status": failed.status, "error": _public(failed.error)}
        raise HTTPException(409, detail) from None
    return {"id": str(order_id), "status": "completed", "output": output}


@router.post("/orders/{order_id}/payment", status_code=202)
async def payment_received(
    order_id: uuid.UUID,
    payment: Payment,
    manager: Manager,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict[str, Any]:
    """The payment provider's webhook: a message to the run, on topic "payment". A redelivered webhook with
    the same Idempotency-Key is stored once ("delivered": false)."""
    delivered = await manager.send(
        str(order_id), payment.model_dump(), topic=PAYMENT_TOPIC, idempotency_key=idempotency_key
    )
    return {"id": str(order_id), "delivered": delivered}


def _public(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored error without its traceback (that stays for operators: `sonamu-tasks show`, the dashboard)."""
    return None if not error else {key: error[key] for key in ("type", "message", "step") if key in error}


async def _run_not_found(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


app = create_app()
