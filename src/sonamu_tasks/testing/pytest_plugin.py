"""The pytest plugin sonamu-tasks installs (entry point `pytest11`): the `workflow_env` fixture.

    async def test_invoice(workflow_env):
        workflow_env.register(send_invoice)
        handle = await workflow_env.run(send_invoice, {"order_id": 7})
        assert await handle.result() == {"sent": True}

An async fixture: it needs pytest-asyncio (with `asyncio_mode = "auto"`, or mark the tests `asyncio`).
Without pytest-asyncio installed the plugin still loads (every pytest run of an environment holding
sonamu-tasks loads it), and the fixture says what is missing when a test asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .env import WorkflowTestEnv

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on the environment

    @pytest.fixture
    def workflow_env() -> WorkflowTestEnv:
        pytest.fail("the workflow_env fixture is async: pip install pytest-asyncio", pytrace=False)

else:

    @pytest_asyncio.fixture
    async def workflow_env() -> AsyncIterator[WorkflowTestEnv]:  # type: ignore[misc]
        """A WorkflowTestEnv with no workflows yet (`register` them), on a test clock, stopped afterwards
        (failing the test if a mock stood in for no step)."""
        async with WorkflowTestEnv() as env:
            yield env
