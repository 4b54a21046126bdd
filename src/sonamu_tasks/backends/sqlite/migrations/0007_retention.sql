-- Retention: finished runs deleted once older than their workflow's retention (see the PostgreSQL migration
-- of the same name). Times are microseconds; retention seconds are REAL.

CREATE INDEX runs_finished ON runs (finished_at) WHERE status IN ('completed', 'failed', 'canceled');
CREATE INDEX messages_by_run ON messages (run_id);

CREATE TABLE workflow_retention (
    workflow_name TEXT PRIMARY KEY,
    seconds       REAL,                      -- NULL: the deleting worker's default retention
    updated_at    INTEGER NOT NULL
);
