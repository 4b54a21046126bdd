from __future__ import annotations

from typing import Any

from sonamu_tasks import workflow


@workflow(version="1")
async def discovered_ok(input: Any) -> Any:
    return input
