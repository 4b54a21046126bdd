-- Messages to a run, events a run publishes, and broadcast events runs wait for.
--
-- messages: sent to one run on a topic, consumed exactly once by its `step.receive` (taking the oldest
--   unconsumed one and checkpointing it are one transaction). The partial index holds only unconsumed
--   messages, per run and topic in order: a receive reads one index entry, however many messages wait for
--   other runs.
-- run_events: what a run publishes with `step.set_event` (latest value wins), read with `get_event`.
-- events: broadcast with `manager.emit`; `step.wait_for_event` takes the first one with its name and key
--   emitted after the run was created. event_waits says which parked runs wait for which event, so an
--   emit wakes exactly them.
-- A run's messages, published events and event waits go with it (ON DELETE CASCADE).

CREATE TABLE messages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    topic           text NOT NULL,
    payload         jsonb,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    consumed_at     timestamptz,
    consumed_by     text                              -- the receive step that took it
);
CREATE INDEX messages_unconsumed ON messages (run_id, topic, id) WHERE consumed_at IS NULL;
CREATE UNIQUE INDEX messages_idempotency ON messages (run_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE run_events (
    run_id     uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key        text NOT NULL,
    value      jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, key)
);

CREATE TABLE events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL,
    key        text NOT NULL DEFAULT '',              -- '' when emitted without a key
    payload    jsonb,
    emitted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_by_name ON events (name, key, emitted_at);

CREATE TABLE event_waits (
    run_id uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name   text NOT NULL,
    key    text NOT NULL,
    PRIMARY KEY (name, key, run_id)
);
CREATE INDEX event_waits_by_run ON event_waits (run_id);

-- Waits are steps too: a receive or an event wait is recorded while it waits (status 'waiting', wake_at its
-- timeout, waits_for what it waits for) and completed with what it got.
ALTER TABLE steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE steps ADD CONSTRAINT steps_kind_check
    CHECK (kind IN ('call', 'sleep', 'child', 'receive', 'event', 'set_event'));
ALTER TABLE steps DROP CONSTRAINT steps_status_check;
ALTER TABLE steps ADD CONSTRAINT steps_status_check CHECK (status IN ('completed', 'failed', 'sleeping', 'waiting'));
ALTER TABLE steps ADD COLUMN waits_for jsonb;
