-- Runs, their step checkpoints, and the workers that execute them, in one SQLite file.
--
-- Times are INTEGER microseconds since the Unix epoch (UTC): they round-trip a Python datetime exactly
-- (a compare-and-set on a time stays exact) and compare as plain integers. REAL would lose microseconds,
-- TEXT would need one fixed format everywhere.
-- JSON values (input, output, error, workflows) are TEXT written and read by the backend.
-- Every time is bound by the backend (one `now` per transaction), so no column defaults to a clock.
-- A migration is run statement by statement: end each statement with `;` at the end of a line.

CREATE TABLE runs (
    id              TEXT PRIMARY KEY,                 -- time-ordered (UUIDv7): newest first by id
    workflow_name   TEXT NOT NULL,
    version         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN
                        ('pending', 'running', 'sleeping', 'paused', 'completed', 'failed', 'canceled')),
    input           TEXT,
    output          TEXT,
    error           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,       -- failed attempts only
    recoveries      INTEGER NOT NULL DEFAULT 0,       -- take-overs after a lease expired
    -- When the run may next be claimed; its meaning follows the status: start or retry time (pending),
    -- lease expiry (running), wake time (sleeping).
    available_at    INTEGER NOT NULL,
    lease_token     TEXT,                             -- the fencing token of the current claim
    worker_id       TEXT,
    idempotency_key TEXT UNIQUE,
    deadline_at     INTEGER,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    updated_at      INTEGER NOT NULL
);

-- The claim reads only unfinished runs, so its cost does not grow with the finished ones.
CREATE INDEX runs_claimable ON runs (available_at)
    WHERE status IN ('pending', 'running', 'sleeping');
CREATE INDEX runs_by_workflow ON runs (workflow_name, id DESC);
CREATE INDEX runs_by_status ON runs (status, id DESC);

CREATE TABLE steps (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('call', 'sleep')),
    status      TEXT NOT NULL CHECK (status IN ('completed', 'failed', 'sleeping')),
    output      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 1,
    wake_at     INTEGER,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    workflows    TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
