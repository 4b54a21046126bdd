-- The trace context of the caller of run() (see the PostgreSQL migration of the same name).

ALTER TABLE runs ADD COLUMN trace_context TEXT;
