-- Child workflows and durable waits on them (see the PostgreSQL migration of the same name).
--
-- SQLite cannot change a CHECK constraint: runs and steps are rebuilt with the new status 'waiting', the new
-- step kind 'child' and the parent columns. The migration runs with foreign keys off (so dropping the old
-- table cascades nothing) and checks them before it commits.

CREATE TABLE runs_new (
    id               TEXT PRIMARY KEY,
    workflow_name    TEXT NOT NULL,
    version          TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN
                         ('pending', 'running', 'sleeping', 'waiting', 'paused', 'completed', 'failed', 'canceled')),
    input            TEXT,
    output           TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    recoveries       INTEGER NOT NULL DEFAULT 0,
    available_at     INTEGER NOT NULL,
    lease_token      TEXT,
    worker_id        TEXT,
    idempotency_key  TEXT UNIQUE,
    deadline_at      INTEGER,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL,
    requested_action TEXT CHECK (requested_action IN ('cancel', 'pause')),
    parent_id        TEXT,
    parent_step      TEXT,
    detached         INTEGER NOT NULL DEFAULT 0
);

INSERT INTO runs_new (id, workflow_name, version, status, input, output, error, attempts, recoveries, available_at,
                      lease_token, worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at,
                      updated_at, requested_action)
SELECT id, workflow_name, version, status, input, output, error, attempts, recoveries, available_at, lease_token,
       worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at, updated_at, requested_action
FROM runs;

DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;

CREATE INDEX runs_claimable ON runs (available_at)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting');
CREATE INDEX runs_by_workflow ON runs (workflow_name, id DESC);
CREATE INDEX runs_by_status ON runs (status, id DESC);
CREATE INDEX runs_by_parent ON runs (parent_id, id) WHERE parent_id IS NOT NULL;

CREATE TABLE steps_new (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('call', 'sleep', 'child')),
    status      TEXT NOT NULL CHECK (status IN ('completed', 'failed', 'sleeping')),
    output      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 1,
    wake_at     INTEGER,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (run_id, name)
);

INSERT INTO steps_new SELECT run_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at
FROM steps;

DROP TABLE steps;
ALTER TABLE steps_new RENAME TO steps;

-- A child that finishes makes its waiting parent due now (updated_at is the transaction's clock).
CREATE TRIGGER runs_wake_parent AFTER UPDATE OF status ON runs
    WHEN NEW.parent_id IS NOT NULL AND OLD.status IS NOT NEW.status
         AND NEW.status IN ('completed', 'failed', 'canceled')
BEGIN
    UPDATE runs SET status = 'pending', available_at = NEW.updated_at, updated_at = NEW.updated_at
    WHERE id = NEW.parent_id AND status = 'waiting';
END;

-- Canceling a run cancels its unfinished, attached children (recursive_triggers carries it down the tree).
CREATE TRIGGER runs_cancel_children AFTER UPDATE OF status ON runs
    WHEN NEW.status = 'canceled' AND OLD.status IS NOT NEW.status
BEGIN
    UPDATE runs
    SET status = CASE WHEN status = 'running' THEN status ELSE 'canceled' END,
        requested_action = CASE WHEN status = 'running' THEN 'cancel' END,
        error = CASE WHEN status = 'running' THEN error
                     ELSE json_object('type', 'Canceled', 'message', 'canceled with its parent run ' || NEW.id) END,
        finished_at = CASE WHEN status = 'running' THEN NULL ELSE NEW.updated_at END,
        lease_token = CASE WHEN status = 'running' THEN lease_token END,
        worker_id = CASE WHEN status = 'running' THEN worker_id END,
        updated_at = NEW.updated_at
    WHERE parent_id = NEW.id AND NOT detached
      AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused');
END;
