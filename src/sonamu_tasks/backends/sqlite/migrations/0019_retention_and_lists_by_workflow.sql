-- Retention reads one workflow's finished runs at a time (see the PostgreSQL migration of the same name).
-- runs_finished stays: a release before this one names it (INDEXED BY) in its retention queries.
CREATE INDEX runs_finished_by_workflow ON runs (workflow_name, finished_at)
    WHERE status IN ('completed', 'failed', 'canceled');
