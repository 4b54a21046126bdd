"""A dashboard served in this process, its requests going straight to the ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from sonamu_tasks.dashboard import Dashboard


@asynccontextmanager
async def served(app: Dashboard) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` (its manager started for the block), as a browser on the loopback sees it."""
    await app.manager.start()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as client:
            yield client
    finally:
        await app.manager.stop()
