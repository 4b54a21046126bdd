-- Messages to a run, events a run publishes, and broadcast events runs wait for (see the PostgreSQL
-- migration of the same name). steps is rebuilt for its new kinds, the status 'waiting' and waits_for.

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id          TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    topic           TEXT NOT NULL,
    payload         TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    consumed_at     INTEGER,
    consumed_by     TEXT
);
CREATE INDEX messages_unconsumed ON messages (run_id, topic, id) WHERE consumed_at IS NULL;
CREATE UNIQUE INDEX messages_idempotency ON messages (run_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE run_events (
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    key        TEXT NOT NULL DEFAULT '',
    payload    TEXT,
    emitted_at INTEGER NOT NULL
);
CREATE INDEX events_by_name ON events (name, key, emitted_at);

CREATE TABLE event_waits (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    key    TEXT NOT NULL,
    PRIMARY KEY (name, key, run_id)
);
CREATE INDEX event_waits_by_run ON event_waits (run_id);

CREATE TABLE steps_new (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('call', 'sleep', 'child', 'receive', 'event', 'set_event')),
    status      TEXT NOT NULL CHECK (status IN ('completed', 'failed', 'sleeping', 'waiting')),
    output      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 1,
    wake_at     INTEGER,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    waits_for   TEXT,
    PRIMARY KEY (run_id, name)
);

INSERT INTO steps_new (run_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at)
SELECT run_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at FROM steps;

DROP TABLE steps;
ALTER TABLE steps_new RENAME TO steps;
