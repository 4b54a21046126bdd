-- Queues and flow control (see the PostgreSQL migration 0012 for the design). SQLite has one writer at a
-- time, so a claim's counts and the runs it takes are one transaction no other claim interleaves with.

CREATE TABLE queues (
    name                TEXT PRIMARY KEY,
    concurrency         INTEGER CHECK (concurrency > 0),
    worker_concurrency  INTEGER CHECK (worker_concurrency > 0),
    rate_limit          INTEGER CHECK (rate_limit > 0),
    rate_period         INTEGER CHECK (rate_period > 0),          -- microseconds
    per_key_concurrency INTEGER CHECK (per_key_concurrency > 0),
    updated_at          INTEGER NOT NULL,
    CHECK ((rate_limit IS NULL) = (rate_period IS NULL))
);
INSERT INTO queues (name, updated_at) VALUES ('default', 0);

CREATE TABLE workflow_queues (
    workflow_name TEXT NOT NULL,
    version       TEXT NOT NULL,
    queue         TEXT NOT NULL,
    PRIMARY KEY (workflow_name, version)
);

CREATE TABLE queue_starts (
    queue      TEXT NOT NULL,
    started_at INTEGER NOT NULL
);
CREATE INDEX queue_starts_by_queue ON queue_starts (queue, started_at);

ALTER TABLE runs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN concurrency_key TEXT;
ALTER TABLE runs ADD COLUMN debounce_key TEXT;
ALTER TABLE runs ADD COLUMN key_parked INTEGER NOT NULL DEFAULT 0;

-- A queue's stream a priority level at a time, due runs first within a level (see claim_runs in the backend).
CREATE INDEX runs_claim_queue ON runs (queue, priority, available_at)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT key_parked;
CREATE INDEX runs_executing ON runs (queue, concurrency_key) WHERE status = 'running';
CREATE INDEX runs_key_parked ON runs (queue, concurrency_key, priority, available_at)
    WHERE key_parked AND status IN ('pending', 'running', 'sleeping', 'waiting');
CREATE UNIQUE INDEX runs_debounce ON runs (workflow_name, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'pending' AND started_at IS NULL;

-- A run with a concurrency key leaves 'running': the oldest run parked on its key is claimable again.
CREATE TRIGGER runs_release_key_slot AFTER UPDATE OF status ON runs
    WHEN OLD.status = 'running' AND NEW.status <> 'running' AND NEW.concurrency_key IS NOT NULL
BEGIN
    UPDATE runs SET key_parked = 0
    WHERE id = (SELECT id FROM runs
                WHERE queue = NEW.queue AND concurrency_key = NEW.concurrency_key AND key_parked
                  AND status IN ('pending', 'running', 'sleeping', 'waiting')
                ORDER BY priority, available_at
                LIMIT 1);
END;
