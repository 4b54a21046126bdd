"""sonamu-tasks: durable workflows for Python on PostgreSQL."""

from __future__ import annotations

from .config import Config, TasksConfig, WorkerOptions, define_config
from .definition import WorkflowDefinition, workflow
from .duration import Duration, parse_duration
from .errors import (
    BackendClosed,
    BackendUnavailable,
    ChildWorkflowFailed,
    ConfigError,
    InvalidDuration,
    InvalidInput,
    InvalidName,
    InvalidValue,
    NonRetryableError,
    ResultTimeout,
    RunNotFound,
    ScheduleInUse,
    ScheduleNotFound,
    SerializationError,
    SonamuTasksError,
    StepNameConflict,
    StepTimeout,
    StorageError,
    UnusableDuration,
    WorkflowDefinitionError,
    WorkflowFailed,
    WorkflowNotRegistered,
)
from .handle import RunHandle
from .manager import RunPage, StrandedRuns, WorkflowManager
from .queue import Queue
from .records import QueueStats
from .retry import RetryDecision, RetryPolicy
from .schedule import Schedule
from .status import RunStatus, StepStatus
from .step import ChildHandle, Step, StepWrapper
from .sync_client import SyncClient, SyncRunHandle

__all__ = [
    "BackendClosed",
    "BackendUnavailable",
    "ChildHandle",
    "ChildWorkflowFailed",
    "Config",
    "ConfigError",
    "Duration",
    "InvalidDuration",
    "InvalidInput",
    "InvalidName",
    "InvalidValue",
    "NonRetryableError",
    "Queue",
    "QueueStats",
    "ResultTimeout",
    "RetryDecision",
    "RetryPolicy",
    "RunHandle",
    "RunNotFound",
    "RunPage",
    "RunStatus",
    "Schedule",
    "ScheduleInUse",
    "ScheduleNotFound",
    "SerializationError",
    "SonamuTasksError",
    "Step",
    "StepNameConflict",
    "StepStatus",
    "StepTimeout",
    "StepWrapper",
    "StorageError",
    "StrandedRuns",
    "SyncClient",
    "SyncRunHandle",
    "TasksConfig",
    "UnusableDuration",
    "WorkerOptions",
    "WorkflowDefinition",
    "WorkflowDefinitionError",
    "WorkflowFailed",
    "WorkflowManager",
    "WorkflowNotRegistered",
    "define_config",
    "parse_duration",
    "workflow",
]
