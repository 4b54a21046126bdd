"""RunHandle: what `run()` returns, to watch and wait for one run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, cast

from typing_extensions import TypeVar

from . import serde
from .backends.base import RunRecord
from .status import RunStatus

if TYPE_CHECKING:
    from .manager import WorkflowManager

R_co = TypeVar("R_co", covariant=True, default=Any)
"""What the run's workflow returns; Any for a run started by name or found by id."""


class RunHandle(Generic[R_co]):
    """One run: `result()` gives the workflow's output as the type its function declares (a pydantic model,
    a dataclass, a datetime ... rebuilt from the stored JSON) when the workflow was given by definition or is
    registered in this process; plain JSON otherwise."""

    def __init__(
        self,
        manager: WorkflowManager,
        run_id: str,
        workflow_name: str,
        *,
        created: bool = True,
        output_type: Any = None,
    ) -> None:
        self._manager = manager
        self.id = run_id
        self.workflow_name = workflow_name
        self.created = created
        """False when `run()` found an existing run for the idempotency key."""
        self.output_type = output_type
        """The return annotation of the workflow's function, which `result()` rebuilds the output as (None:
        not known here, the output comes as JSON)."""

    def __repr__(self) -> str:
        return f"<RunHandle {self.workflow_name} {self.id}>"

    async def status(self) -> RunStatus:
        return (await self.info()).status

    async def info(self, *, with_steps: bool = False) -> RunRecord:
        """The stored run: status, input, output, error, attempts, timestamps (and steps)."""
        return await self._manager.get_run(self.id, with_steps=with_steps)

    async def result(self, timeout: float | None = None) -> R_co:
        """Wait for the run to finish and return its output, as the type the workflow declares (`output_type`).

        Raises WorkflowFailed (with the stored error) if it failed or was canceled, ResultTimeout if
        `timeout` seconds pass first (also when the database is down: its status is "unknown" then), and
        SerializationError if the stored output does not fit the declared type. Woken by the database's
        notification, not by polling.
        """
        output = await self._manager.wait_for_result(self.id, timeout=timeout)
        return cast(R_co, self._decoded(output))

    def _decoded(self, output: Any) -> Any:
        return declared_output(self.id, self.workflow_name, self.output_type, output)

    async def get_event(self, key: str, timeout: float | None = None) -> Any:
        """The value the run published under `key` (step.set_event), waiting until it is set; None when the
        run finished without setting it, or after `timeout` seconds (also when the database did not answer
        by then)."""
        return await self._manager.get_event(self.id, key, timeout=timeout)

    async def send(self, message: Any, *, topic: str | None = None, idempotency_key: str | None = None) -> bool:
        """Send the run a message (see `WorkflowManager.send`)."""
        return await self._manager.send(self.id, message, topic=topic, idempotency_key=idempotency_key)

    async def cancel(self) -> RunStatus:
        """Cancel: at once unless running; a running run stops at its next step boundary."""
        return await self._manager.cancel(self.id)

    async def pause(self) -> RunStatus:
        return await self._manager.pause(self.id)

    async def resume(self) -> RunStatus:
        return await self._manager.resume(self.id)

    async def retry(self) -> RunStatus:
        """Start a failed or canceled run again from its failed step."""
        return await self._manager.retry(self.id)


def declared_output(run_id: str, workflow_name: str, output_type: Any, output: Any) -> Any:
    """A run's output (JSON) as its workflow's declared `output_type`, for every kind of handle."""
    return serde.decode_output(output, output_type, f"the output of run {run_id} ({workflow_name})")
