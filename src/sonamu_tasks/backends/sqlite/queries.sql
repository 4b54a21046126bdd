-- Every query the SQLite backend runs, by name. Parameters are always bound, never formatted in.
-- Times and durations are integer microseconds (see migrations/0001_initial.sql); `:now` is the one
-- clock reading of the transaction. Writes run inside BEGIN IMMEDIATE: the file's single write lock
-- orders them, which is what FOR UPDATE row locks do on PostgreSQL. Lists arrive as JSON arrays
-- (SQLite has no array parameters) and are unpacked with json_each.

-- create_migrations_table --
CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)

-- migrations_table --
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'

-- applied_migrations --
SELECT name FROM migrations

-- record_migration --
INSERT INTO migrations (name, applied_at) VALUES (:name, :now)

-- create_run --
-- Insert a pending run; a repeated id or idempotency key inserts nothing.
INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                  created_at, updated_at, parent_id, parent_step, detached, trace_context, queue, priority,
                  concurrency_key)
VALUES (:id, :workflow_name, :version, 'pending', :input, :idempotency_key,
        COALESCE(:start_at, :now + COALESCE(:start_delay, 0)),
        COALESCE(:deadline_at, :now + :deadline_delay),
        :now, :now, :parent_id, :parent_step, :detached, :trace_context,
        COALESCE(:queue, (SELECT w.queue FROM workflow_queues w WHERE w.workflow_name = :workflow_name AND w.version = :version), 'default'), :priority, :concurrency_key)
ON CONFLICT DO NOTHING
RETURNING id

-- create_debounced_run --
-- A debounced run: due `debounce` after the first run() of its key; a later run() with the key while it has
-- not started gives it the latest input instead of adding a run. No row when the run's own id is taken: this
-- call's earlier attempt inserted it and its answer was lost.
INSERT INTO runs (id, workflow_name, version, status, input, available_at, deadline_at, created_at, updated_at,
                  trace_context, queue, priority, concurrency_key, debounce_key)
SELECT :id, :workflow_name, :version, 'pending', :input, :now + :debounce,
       COALESCE(:deadline_at, :now + :deadline_delay), :now, :now, :trace_context,
       COALESCE(:queue, (SELECT w.queue FROM workflow_queues w WHERE w.workflow_name = :workflow_name AND w.version = :version), 'default'), :priority, :concurrency_key, :debounce_key
WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = :id)
ON CONFLICT (workflow_name, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'pending' AND started_at IS NULL
DO UPDATE SET input = excluded.input, updated_at = :now
RETURNING id, created_at = :now AND updated_at = :now AS created

-- queue_limited --
-- The queue a new run goes to, and whether it has limits (then only the claim may take the run).
SELECT q.name AS queue,
       EXISTS (SELECT 1 FROM queues l
               WHERE l.name = q.name
                 AND (l.concurrency IS NOT NULL OR l.worker_concurrency IS NOT NULL OR l.rate_limit IS NOT NULL
                      OR l.per_key_concurrency IS NOT NULL)) AS limited
FROM (SELECT COALESCE(:queue, (SELECT w.queue FROM workflow_queues w WHERE w.workflow_name = :workflow_name AND w.version = :version), 'default') AS name) AS q

-- create_claimed_run --
-- Insert a run claimed at once by the worker of the process that starts it: one transaction instead of an
-- insert and a claim. A repeated id or idempotency key inserts nothing.
INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                  lease_token, worker_id, started_at, created_at, updated_at, parent_id, parent_step, detached,
                  trace_context, queue, priority, concurrency_key)
VALUES (:id, :workflow_name, :version, 'running', :input, :idempotency_key, :now + :lease,
        COALESCE(:deadline_at, :now + :deadline_delay), :lease_token, :worker_id, :now, :now, :now,
        :parent_id, :parent_step, :detached, :trace_context, :queue, :priority, :concurrency_key)
ON CONFLICT DO NOTHING
RETURNING id, workflow_name, version, input, attempts, recoveries, lease_token, deadline_at, requested_action,
          trace_context

-- find_run_by_key --
-- The run a repeated create_run collided with.
SELECT id FROM runs WHERE idempotency_key = :idempotency_key OR id = :id

-- queue_limits --
SELECT concurrency, worker_concurrency, rate_limit, rate_period, per_key_concurrency, swept_at
FROM queues WHERE name = :queue

-- count_executing --
-- Runs of the queue executing now: a lease still live, or one under :held_tokens (this worker's, executing here
-- though a late heartbeat let its lease look expired: its slot is not free); with :worker_id, this worker's;
-- with :key, that key's.
SELECT count(*) FROM runs INDEXED BY runs_executing
WHERE queue = :queue AND status = 'running'
  AND (available_at > :now OR lease_token IN (SELECT value FROM json_each(:held_tokens)))
  AND (:worker_id IS NULL OR worker_id = :worker_id)
  AND (:key IS NULL OR concurrency_key = :key)

-- forget_old_starts --
DELETE FROM queue_starts WHERE queue = :queue AND started_at <= :now - :period

-- count_starts --
SELECT count(*) FROM queue_starts WHERE queue = :queue AND started_at > :now - :period

-- record_start --
INSERT INTO queue_starts (queue, started_at) VALUES (:queue, :now)

-- next_level --
-- The next priority level in use in this queue by these workflows: per (workflow, version), one probe of
-- runs_claim_queue for its first level past :after. The runs of the queue's other workflows are never read.
SELECT min((SELECT r.priority FROM runs AS r INDEXED BY runs_claim_queue
            WHERE r.queue = :queue AND r.workflow_name = w.name AND r.version = w.version
              AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
              AND r.priority > :after
            ORDER BY r.priority
            LIMIT 1)) AS priority
FROM (SELECT DISTINCT json_extract(value, '$[0]') AS name, json_extract(value, '$[1]') AS version
      FROM json_each(:workflows)) AS w

-- due_runs --
-- One priority level's due runs, oldest first (runs due at the same moment by id: in creation order); a run
-- still "running" here had its lease expire. Per (workflow, version), the due end of its stream at this level,
-- at most :limit runs off runs_claim_queue (as PostgreSQL's claim_runs reads them); the streams merged by
-- (available_at, id), a sort of at most :limit runs per stream. The queue's other workflows are never read.
-- INDEXED BY: walk the due end of the stream and stop at the limit, whatever the planner guesses from a
-- table it has no statistics of. A running run under one of :held_tokens (a JSON array) is this worker's own,
-- executing, its lease only looking expired (a late heartbeat): never due to it. For a run taken over, the
-- worker it was leased to and when that lease ran out (the claim overwrites both), which the worker logs.
SELECT r.id, r.status = 'running' AS lease_expired, r.status = 'pending' AS starting,
       r.started_at IS NULL AS first_claim, r.concurrency_key, r.worker_id, r.available_at
FROM (SELECT DISTINCT json_extract(value, '$[0]') AS name, json_extract(value, '$[1]') AS version
      FROM json_each(:workflows)) AS w
JOIN runs AS r ON r.rowid IN (
    SELECT d.rowid FROM runs AS d INDEXED BY runs_claim_queue
    WHERE d.queue = :queue AND d.workflow_name = w.name AND d.version = w.version AND d.priority = :level
      AND d.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT d.key_parked
      AND d.available_at <= :now
      AND (d.status = 'running' AND d.lease_token IN (SELECT value FROM json_each(:held_tokens))) IS NOT TRUE
    ORDER BY d.available_at, d.id
    LIMIT :limit)
ORDER BY r.available_at, r.id
LIMIT :limit

-- park_on_key --
UPDATE runs SET key_parked = 1 WHERE id = :id

-- mark_queue_swept --
UPDATE queues SET swept_at = :now WHERE name = :queue

-- sweep_parked_keys --
-- The claim's periodic sweep (see claim_runs in the backend and the PostgreSQL function): the oldest parked run
-- of every key of the queue with fewer than :per_key runs executing (a live lease) goes back into the claim
-- index. It brings back what the trigger runs_release_key_slot cannot: a key freed by a lease that expired, or
-- by the trigger handing the slot to a parked run of a version no live worker serves.
UPDATE runs SET key_parked = 0
WHERE id IN (
    SELECT (SELECT p.id FROM runs AS p INDEXED BY runs_key_parked
            WHERE p.queue = :queue AND p.concurrency_key = k.concurrency_key AND p.key_parked
              AND p.status IN ('pending', 'running', 'sleeping', 'waiting')
            ORDER BY p.priority, p.available_at, p.id
            LIMIT 1)
    FROM (SELECT DISTINCT concurrency_key FROM runs INDEXED BY runs_key_parked
          WHERE queue = :queue AND key_parked AND status IN ('pending', 'running', 'sleeping', 'waiting')) AS k
    WHERE (SELECT count(*) FROM runs AS x INDEXED BY runs_executing
           WHERE x.queue = :queue AND x.concurrency_key = k.concurrency_key AND x.status = 'running'
             AND (x.available_at > :now OR x.lease_token IN (SELECT value FROM json_each(:held_tokens))))
          < :per_key)

-- claim_run --
-- Lease one due run to this worker under a fresh fencing token; a take-over counts as a recovery.
UPDATE runs
SET status = 'running',
    lease_token = :lease_token,
    worker_id = :worker_id,
    available_at = :now + :lease,
    started_at = COALESCE(started_at, :now),
    recoveries = recoveries + :lease_expired,
    updated_at = :now
WHERE id = :id
RETURNING id, workflow_name, version, input, attempts, recoveries, lease_token, deadline_at, requested_action,
          trace_context

-- takeable_run --
-- Whether run :id is the worker's to take by its id (take_run): pending and due, of one of its streams
-- (:workflows) and queues, in a queue without limits (only the claim weighs runs against limits). claim_run then
-- leases it, in the same write transaction.
SELECT started_at IS NULL AS first_claim
FROM runs
WHERE id = :id AND status = 'pending' AND NOT key_parked AND available_at <= :now
  AND queue IN (SELECT value FROM json_each(:queues))
  AND EXISTS (SELECT 1 FROM json_each(:workflows) AS w
              WHERE json_extract(w.value, '$[0]') = workflow_name AND json_extract(w.value, '$[1]') = version)
  AND NOT EXISTS (SELECT 1 FROM queues l
                  WHERE l.name = queue
                    AND (l.concurrency IS NOT NULL OR l.worker_concurrency IS NOT NULL OR l.rate_limit IS NOT NULL
                         OR l.per_key_concurrency IS NOT NULL))

-- next_due_at --
-- When the next claimable run of these workflows in this queue is due (NULL: none). Per (workflow, version), its
-- priority levels in use are walked as next_level walks them (`levels`, one probe each), then each level's first
-- run along available_at is read: as many probes of runs_claim_queue as levels in use, whatever the number of
-- runs, and the queue's other workflows are never read. The runs under :held_tokens are passed, as due_runs
-- passes them.
WITH RECURSIVE
    streams (name, version) AS (
        SELECT DISTINCT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:workflows)),
    levels (name, version, priority) AS (
        SELECT name, version, -2147483649 FROM streams
        UNION ALL
        SELECT l.name, l.version,
               (SELECT r.priority FROM runs AS r INDEXED BY runs_claim_queue
                WHERE r.queue = :queue AND r.workflow_name = l.name AND r.version = l.version
                  AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                  AND r.priority > l.priority
                ORDER BY r.priority
                LIMIT 1)
        FROM levels AS l
        WHERE l.priority IS NOT NULL)
SELECT min((SELECT r.available_at FROM runs AS r INDEXED BY runs_claim_queue
            WHERE r.queue = :queue AND r.workflow_name = l.name AND r.version = l.version
              AND r.priority = l.priority
              AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
              AND (r.status = 'running' AND r.lease_token IN (SELECT value FROM json_each(:held_tokens))) IS NOT TRUE
            ORDER BY r.available_at
            LIMIT 1)) AS available_at
FROM levels AS l
WHERE l.priority > -2147483649

-- rate_window_room_at --
-- When a full rate window has room again: the start that must leave it, plus the window.
SELECT started_at + :period AS room_at FROM queue_starts
WHERE queue = :queue AND started_at > :now - :period
ORDER BY started_at DESC
LIMIT 1 OFFSET :rate_limit - 1

-- heartbeat_runs --
-- Extend the leases this worker still holds; a missing token means the run was taken from it.
UPDATE runs
SET available_at = :now + :lease, updated_at = :now
WHERE (id, lease_token) IN (
      SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:held))
  AND status = 'running'
RETURNING lease_token, requested_action

-- release_runs --
-- Hand runs back, claimable at once (graceful shutdown), in their place: due since their creation, so that a
-- run started before others of its queue or key starts again before them (FIFO goes by available_at; `now`
-- sent it behind every run of its key created while it ran). A cancel or pause request the worker had not
-- honoured yet is applied instead: canceled (the triggers cancel its children and wake its parent) or paused.
UPDATE runs
SET status = CASE requested_action WHEN 'cancel' THEN 'canceled' WHEN 'pause' THEN 'paused' ELSE 'pending' END,
    error = CASE WHEN requested_action = 'cancel' THEN :canceled_error ELSE error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN :now END,
    requested_action = NULL,
    available_at = MIN(:now, created_at), lease_token = NULL, worker_id = NULL, updated_at = :now
WHERE (id, lease_token) IN (
      SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:held))
  AND status = 'running'

-- run_versions --
-- The workflow and version of each of these runs (the runs a call found by their idempotency keys): one read
-- for all of them.
SELECT id, workflow_name, version FROM runs WHERE id IN (SELECT value FROM json_each(:ids))

-- get_run --
SELECT id, workflow_name, version, status, input, output, error, attempts, recoveries, available_at,
       worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at, updated_at,
       requested_action, parent_id, parent_step, detached, forked_from, forked_step, queue, priority, concurrency_key
FROM runs WHERE id = :run_id

-- get_run_capped --
-- See the PostgreSQL query of the same name: values longer than :limit characters come as an excerpt; with a
-- limit of 0 they are not read at all (typeof() looks at the record's header only), an empty excerpt without
-- a length saying that there is one.
SELECT id, workflow_name, version, status,
       CASE WHEN :limit > 0 AND length(input) <= :limit THEN input END AS input,
       CASE WHEN :limit > 0 AND length(output) <= :limit THEN output END AS output,
       error, attempts, recoveries, available_at, worker_id, idempotency_key, deadline_at, created_at, started_at,
       finished_at, updated_at, requested_action, parent_id, parent_step, detached, forked_from, forked_step, queue,
       priority, concurrency_key,
       CASE WHEN typeof(input) = 'null' THEN NULL WHEN :limit = 0 THEN ''
            WHEN length(input) > :limit THEN substr(input, 1, :limit) END AS input_excerpt,
       CASE WHEN :limit > 0 THEN length(input) END AS input_length,
       CASE WHEN typeof(output) = 'null' THEN NULL WHEN :limit = 0 THEN ''
            WHEN length(output) > :limit THEN substr(output, 1, :limit) END AS output_excerpt,
       CASE WHEN :limit > 0 THEN length(output) END AS output_length
FROM runs WHERE id = :run_id

-- load_steps_capped --
-- A child step's output (its children's ids, listed by the page) always comes whole.
SELECT name, kind, status,
       CASE WHEN kind = 'child' OR (:limit > 0 AND length(output) <= :limit) THEN output END AS output,
       error, attempts, wake_at, started_at, finished_at, waits_for,
       CASE WHEN kind = 'child' OR typeof(output) = 'null' THEN NULL WHEN :limit = 0 THEN ''
            WHEN length(output) > :limit THEN substr(output, 1, :limit) END AS output_excerpt,
       CASE WHEN :limit > 0 AND kind <> 'child' THEN length(output) END AS output_length
FROM steps WHERE run_id = :run_id
ORDER BY started_at, name

-- save_step --
-- Checkpoint a step's result, only while this claim still owns the run.
INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at)
SELECT id, :name, :kind, 'completed', :output, 1, :started_at, :finished_at
FROM runs
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'completed', output = excluded.output, error = NULL, attempts = s.attempts + (s.kind <> 'child'),
    started_at = excluded.started_at, finished_at = excluded.finished_at
RETURNING 1

-- park_run --
-- The run leaves its worker (no slot, no lease) until a wait is satisfied: the backend works out the status
-- ('sleeping', 'waiting' on children, or 'pending' when a child it waits for finished already) and the time
-- it is due. The write lock orders this against a child's finishing transaction, whose trigger wakes a
-- waiting parent. A cancel or pause stored before it and not yet heard of by the worker is applied here, not at
-- the wake time (see the PostgreSQL query of the same name): canceled, or paused keeping its wake time (due at
-- once on resume when it waits for an arrival).
UPDATE runs
SET status = CASE requested_action WHEN 'cancel' THEN 'canceled' WHEN 'pause' THEN 'paused' ELSE :status END,
    available_at = CASE WHEN requested_action = 'pause' AND :status <> 'sleeping' THEN :now ELSE :available_at END,
    error = CASE WHEN requested_action = 'cancel' THEN :canceled_error ELSE error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN :now END,
    requested_action = NULL,
    lease_token = NULL, worker_id = NULL, updated_at = :now
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
RETURNING status, available_at

-- children_finished --
SELECT id FROM runs
WHERE id IN (SELECT value FROM json_each(:children)) AND status IN ('completed', 'failed', 'canceled')

-- owns_run --
-- A claim's fence for a write of several statements (the write lock keeps it true until the commit).
SELECT 1 FROM runs WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'

-- record_child_step --
INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
VALUES (:run_id, :name, 'child', 'completed', :output, 1, :started_at, :now)
ON CONFLICT (run_id, name) DO NOTHING

-- count_children --
SELECT status, count(*) AS n FROM runs WHERE parent_id = :run_id GROUP BY status

-- load_children --
SELECT id, status, output, error FROM runs WHERE parent_id = :run_id

-- record_wait --
-- A timed wait of a parked run (a sleep, a receive, an event wait): runs in the same transaction as
-- park_run, after it has checked the lease.
INSERT INTO steps (run_id, name, kind, status, wake_at, attempts, started_at, waits_for)
VALUES (:run_id, :name, :kind, :status, :wake_at, 1, :started_at, :waits_for)
ON CONFLICT (run_id, name) DO UPDATE SET wake_at = excluded.wake_at, status = excluded.status

-- subscribe_event --
INSERT INTO event_waits (run_id, name, key) VALUES (:run_id, :event, :key) ON CONFLICT DO NOTHING

-- lock_parking_run --
-- The owning claim's view of the run (the write lock keeps it so until the commit).
SELECT created_at, deadline_at FROM runs WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'

-- messages_waiting --
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE run_id = :run_id AND topic IN (SELECT value FROM json_each(:topics)) AND consumed_at IS NULL
) AS waiting

-- event_emitted --
-- The first event with this name and key emitted since `since` (the run's creation).
SELECT payload FROM events
WHERE name = :event AND key = :key AND emitted_at >= :since
ORDER BY emitted_at, id
LIMIT 1

-- completed_step --
SELECT output FROM steps WHERE run_id = :run_id AND name = :name AND status = 'completed'

-- oldest_message --
SELECT id, payload FROM messages
WHERE run_id = :run_id AND topic = :topic AND consumed_at IS NULL
ORDER BY id
LIMIT 1

-- consume_message --
UPDATE messages SET consumed_at = :now, consumed_by = :name WHERE id = :id

-- complete_wait_step --
-- A receive or event wait, completed with what it got (None after its timeout).
INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at, waits_for)
VALUES (:run_id, :name, :kind, 'completed', :output, 1, :started_at, :now, :waits_for)
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'completed', output = excluded.output, finished_at = excluded.finished_at, wake_at = NULL

-- unsubscribe_event --
DELETE FROM event_waits WHERE run_id = :run_id AND name = :event AND key = :key

-- publish_run_event --
INSERT INTO run_events (run_id, key, value, updated_at) VALUES (:run_id, :key, :value, :now)
ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at

-- record_set_event --
INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
VALUES (:run_id, :name, 'set_event', 'completed', :value, 1, :now, :now)
ON CONFLICT (run_id, name) DO NOTHING

-- wake_for_message --
-- A message arrives: a waiting run is due now. A completed run takes none (no receive would ever take it).
UPDATE runs
SET status = CASE WHEN status = 'waiting' THEN 'pending' ELSE status END,
    available_at = CASE WHEN status = 'waiting' THEN :now ELSE available_at END,
    updated_at = CASE WHEN status = 'waiting' THEN :now ELSE updated_at END
WHERE id = :run_id AND status <> 'completed'
RETURNING id

-- stored_message --
-- A message of this key stored for the run before (a send made again after a lost answer, a double click).
SELECT 1 FROM messages WHERE run_id = :run_id AND idempotency_key = :idempotency_key

-- store_message --
INSERT INTO messages (run_id, topic, payload, idempotency_key, created_at)
VALUES (:run_id, :topic, :payload, :idempotency_key, :now)
ON CONFLICT DO NOTHING
RETURNING id

-- store_event --
INSERT INTO events (name, key, payload, emitted_at) VALUES (:event, :key, :payload, :now)

-- wake_subscribers --
-- Every run parked on this event is due now; the subscriptions are used up.
UPDATE runs SET status = 'pending', available_at = :now, updated_at = :now
WHERE status = 'waiting' AND id IN (SELECT run_id FROM event_waits WHERE name = :event AND key = :key)
RETURNING id

-- drop_subscribers --
DELETE FROM event_waits WHERE name = :event AND key = :key

-- complete_sleep --
UPDATE steps SET status = 'completed', finished_at = :now
WHERE run_id = :run_id AND name = :name
  AND EXISTS (SELECT 1 FROM runs WHERE id = :run_id AND lease_token = :lease_token AND status = 'running')
RETURNING 1

-- complete_run --
-- A cancel or pause asked for during the last step has nothing left to stop, and is dropped.
UPDATE runs
SET status = 'completed', output = :output, error = NULL, lease_token = NULL, requested_action = NULL,
    finished_at = :now, updated_at = :now
WHERE id = :run_id AND lease_token = :lease_token AND status = 'running'
RETURNING 1

-- record_step_failure --
-- Runs in the same transaction as retry_run/fail_run, after it has checked the lease.
INSERT INTO steps AS s (run_id, name, kind, status, error, attempts, started_at, finished_at)
VALUES (:run_id, :name, 'call', 'failed', :error, 1, :started_at, :now)
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'failed', error = excluded.error, attempts = s.attempts + 1,
    started_at = excluded.started_at, finished_at = excluded.finished_at

-- register_worker --
INSERT INTO workers (id, host, pid, workflows, concurrency, queues, started_at, heartbeat_at)
VALUES (:id, :host, :pid, :workflows, :concurrency, :queues, :now, :now)
ON CONFLICT (id) DO UPDATE
SET workflows = excluded.workflows, concurrency = excluded.concurrency, queues = excluded.queues,
    heartbeat_at = :now

-- upsert_schedule --
-- A changed expression or timezone restarts the schedule from the new next fire; an unchanged one keeps
-- its place, so a restart at the fire moment skips nothing.
INSERT INTO schedules AS s (name, workflow_name, version, expression, timezone, input, next_fire_at,
                            created_at, updated_at)
VALUES (:name, :workflow_name, :version, :expression, :timezone, :input, :next_fire_at, :now, :now)
ON CONFLICT (name) DO UPDATE
SET workflow_name = excluded.workflow_name, version = excluded.version, input = excluded.input,
    expression = excluded.expression, timezone = excluded.timezone,
    next_fire_at = CASE WHEN (s.expression, s.timezone) = (excluded.expression, excluded.timezone)
                        THEN s.next_fire_at ELSE excluded.next_fire_at END,
    updated_at = :now

-- advance_schedule --
-- Compare-and-set on next_fire_at: of the workers that read the same due time, exactly one advances it. (No
-- row locks to skip here: the one writer at a time holds the whole file, for a transaction this short.)
-- The version becomes the one this fire runs (workers of several releases may fire a schedule).
UPDATE schedules
SET next_fire_at = :next_fire_at, last_fire_at = :fire_at, last_run_id = :run_id,
    version = COALESCE(:version, version), updated_at = :now
WHERE name = :name AND next_fire_at = :expected
RETURNING name

-- live_worker_of --
-- Whether a live worker registers this workflow, by the database's clock (delete_schedule's guard).
SELECT EXISTS (
    SELECT 1 FROM workers w, json_each(w.workflows) AS e
    WHERE w.heartbeat_at > :now - :stale_after_us AND json_extract(e.value, '$[0]') = :workflow_name
) AS live

-- delete_schedule --
-- A stored schedule deleted by hand, while it is still this workflow's (after live_worker_of, in the same
-- write transaction).
DELETE FROM schedules WHERE name = :name AND workflow_name = :workflow_name

-- delete_stale_schedules --
-- Schedules of these workflows that the code no longer declares.
DELETE FROM schedules
WHERE workflow_name IN (SELECT value FROM json_each(:workflows))
  AND name NOT IN (SELECT value FROM json_each(:keep))

-- list_schedules --
SELECT name, workflow_name, version, expression, timezone, input, next_fire_at, last_fire_at, last_run_id
FROM schedules ORDER BY name

-- list_runs --
-- Newest first; keyset pagination on the time-ordered id (canonical lowercase text sorts as the UUID
-- does), so page N costs what page 1 costs. `above_id` bounds the id (the cursor, and created_before widened
-- by a margin: RunQuery.above_id), so the scan starts where the times do; created_at stays the exact filter.
-- Without a bound it is 'g', which sorts after every id (hex digits and dashes): a plain range the primary key
-- serves, where "IS NULL OR" would scan.
-- With :value_limit, values longer than that as an excerpt and a length, as get_run_capped here (0: none read);
-- NULL: whole values.
SELECT id, workflow_name, version, status,
       CASE WHEN :value_limit IS NULL OR (:value_limit > 0 AND length(input) <= :value_limit) THEN input END AS input,
       CASE WHEN :value_limit IS NULL OR (:value_limit > 0 AND length(output) <= :value_limit) THEN output END
           AS output,
       error, attempts, recoveries, available_at, worker_id, idempotency_key, deadline_at, created_at, started_at,
       finished_at, updated_at, requested_action, parent_id, parent_step, detached, forked_from, forked_step, queue,
       priority, concurrency_key,
       CASE WHEN :value_limit IS NULL OR typeof(input) = 'null' THEN NULL WHEN :value_limit = 0 THEN ''
            WHEN length(input) > :value_limit THEN substr(input, 1, :value_limit) END AS input_excerpt,
       CASE WHEN :value_limit > 0 THEN length(input) END AS input_length,
       CASE WHEN :value_limit IS NULL OR typeof(output) = 'null' THEN NULL WHEN :value_limit = 0 THEN ''
            WHEN length(output) > :value_limit THEN substr(output, 1, :value_limit) END AS output_excerpt,
       CASE WHEN :value_limit > 0 THEN length(output) END AS output_length
FROM runs
WHERE (:workflow IS NULL OR workflow_name = :workflow)
  AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))
  AND id < COALESCE(:above_id, 'g')
  AND (:parent_id IS NULL OR parent_id = :parent_id)
  AND (:version IS NULL OR version = :version)
  AND (:queue IS NULL OR queue = :queue)
  AND (:created_after IS NULL OR created_at >= :created_after)
  AND (:created_before IS NULL OR created_at < :created_before)
ORDER BY id DESC
LIMIT :limit

-- unfinished_by_version --
SELECT workflow_name, version, status, count(*) AS n, min(created_at) AS oldest
FROM runs
WHERE status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')
GROUP BY workflow_name, version, status
ORDER BY workflow_name, version, status

-- fork_steps --
INSERT INTO steps (run_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at, waits_for)
SELECT :new_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at, waits_for
FROM steps
WHERE run_id = :source_id AND name IN (SELECT value FROM json_each(:names))

-- pause_run --
-- Running under a live lease: at its next step boundary. Otherwise paused at once (it is not claimed until
-- resumed), a run whose worker's lease expired included (see cancel_run: its lease token is cleared, so a
-- stalled worker is shut out). A waiting run is due at once when resumed: it replays and waits again for what
-- has not happened yet.
UPDATE runs
SET status = CASE WHEN status = 'running' AND available_at > :now THEN status ELSE 'paused' END,
    requested_action = CASE WHEN status = 'running' AND available_at > :now THEN 'pause' END,
    available_at = CASE WHEN status = 'waiting' THEN :now ELSE available_at END,
    lease_token = CASE WHEN status = 'running' AND available_at > :now THEN lease_token END,
    worker_id = CASE WHEN status = 'running' AND available_at > :now THEN worker_id END,
    updated_at = :now
WHERE id = :run_id AND status IN ('pending', 'running', 'sleeping', 'waiting')
  AND requested_action IS NOT 'cancel'
RETURNING status

-- due_backlog --
SELECT queue, workflow_name, version, count(*) AS n, (:now - min(available_at)) / 1000000.0 AS oldest
FROM runs
WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND available_at <= :now
GROUP BY queue, workflow_name, version

-- overdue_run --
-- Whether a pending run's deadline passed: read first, so that a look finding nothing takes no write lock.
-- INDEXED BY (here and below): runs_overdue holds only pending runs with a deadline; the planner, which knows no
-- better, took runs_by_status and read every pending run.
SELECT 1 FROM runs INDEXED BY runs_overdue
WHERE status = 'pending' AND deadline_at IS NOT NULL AND deadline_at <= :now
LIMIT 1

-- fail_overdue_runs --
-- Up to `limit` pending runs whose deadline passed, failed as a claim fails them (see the PostgreSQL query of the
-- same name; no row locks: the write lock is the file's). The message's time is deadline_at in ISO 8601, UTC.
UPDATE runs
SET status = 'failed', attempts = attempts + 1,
    error = json_object(
        'type', 'DeadlineExceeded',
        'message', 'deadline exceeded: run ' || id || ' was due by '
                   || strftime('%Y-%m-%dT%H:%M:%S', deadline_at / 1000000, 'unixepoch')
                   || printf('.%06d+00:00', deadline_at % 1000000)),
    lease_token = NULL, worker_id = NULL, requested_action = NULL, key_parked = 0,
    finished_at = :now, updated_at = :now
WHERE id IN (SELECT id FROM runs INDEXED BY runs_overdue
             WHERE status = 'pending' AND deadline_at IS NOT NULL AND deadline_at <= :now
             ORDER BY deadline_at
             LIMIT :limit)
RETURNING id, workflow_name, version, parent_id, queue, concurrency_key

-- save_retention --
-- The retention each workflow version registered here declares (see the PostgreSQL query of the same name):
-- one row per (workflow, version), a worker replacing only the versions it declares.
INSERT INTO workflow_version_retention (workflow_name, version, seconds, updated_at)
SELECT json_extract(value, '$.name'), json_extract(value, '$.version'), json_extract(value, '$.seconds'), :now
FROM json_each(:policies) WHERE true
ON CONFLICT (workflow_name, version) DO UPDATE SET seconds = excluded.seconds, updated_at = excluded.updated_at
WHERE seconds IS NOT excluded.seconds

-- delete_finished_runs --
-- One batch of retention (see the PostgreSQL query of the same name): the oldest finished runs of one workflow
-- past `older_than` (microseconds), with their steps, messages, events and event waits (ON DELETE CASCADE);
-- never an unfinished run, never a child whose parent is unfinished or finished more recently.
-- INDEXED BY: read that workflow's finished runs oldest first off runs_finished_by_workflow and stop at the limit
-- (or at the first one not expired), under the write lock. Without statistics the planner took runs_by_status
-- and sorted every finished run (0.2 s a batch with 100,000 of them, even with nothing to delete); runs_finished,
-- by finish time alone, walked the runs of every other workflow finished before the cutoff.
DELETE FROM runs
WHERE id IN (
    SELECT r.id
    FROM runs AS r INDEXED BY runs_finished_by_workflow
    WHERE r.workflow_name = :workflow
      AND r.status IN ('completed', 'failed', 'canceled')
      AND r.status IN (SELECT value FROM json_each(:statuses))
      AND r.finished_at < :now - :older_than
      AND NOT EXISTS (
          SELECT 1 FROM runs p
          WHERE p.id = r.parent_id
            AND (p.status NOT IN ('completed', 'failed', 'canceled') OR p.finished_at >= :now - :older_than))
    ORDER BY r.finished_at
    LIMIT :limit
)
RETURNING id

-- count_finished_runs --
-- What delete_finished_runs would delete, all batches together: the expired end of the workflow's range only.
SELECT count(*) AS n
FROM runs AS r INDEXED BY runs_finished_by_workflow
WHERE r.workflow_name = :workflow
  AND r.status IN ('completed', 'failed', 'canceled')
  AND r.status IN (SELECT value FROM json_each(:statuses))
  AND r.finished_at < :now - :older_than
  AND NOT EXISTS (
      SELECT 1 FROM runs p
      WHERE p.id = r.parent_id
        AND (p.status NOT IN ('completed', 'failed', 'canceled') OR p.finished_at >= :now - :older_than))

-- finished_workflows --
-- The names of the workflows that have finished runs, in order: one probe of runs_finished_by_workflow per name
-- (a loose index scan; see the PostgreSQL query of the same name).
WITH RECURSIVE names (name) AS (
    SELECT (SELECT workflow_name FROM runs INDEXED BY runs_finished_by_workflow
            WHERE status IN ('completed', 'failed', 'canceled')
            ORDER BY workflow_name LIMIT 1)
    UNION ALL
    SELECT (SELECT r.workflow_name FROM runs AS r INDEXED BY runs_finished_by_workflow
            WHERE r.status IN ('completed', 'failed', 'canceled') AND r.workflow_name > names.name
            ORDER BY r.workflow_name LIMIT 1)
    FROM names
    WHERE names.name IS NOT NULL
)
SELECT name FROM names WHERE name IS NOT NULL

-- unreachable_events_horizon --
-- The emission time before which no stored run can read a broadcast event (see the PostgreSQL query of the same
-- name): the creation of the oldest run that is not completed, or now, less `margin` (microseconds). NULL when
-- no event is that old. The oldest run of each status is its first by id, as there (runs_by_status).
SELECT CASE WHEN (SELECT min(emitted_at) FROM events) < :now - :margin
            THEN min(:now, COALESCE((SELECT min((SELECT r.created_at FROM runs r
                                                 WHERE r.status = s.column1 ORDER BY r.id LIMIT 1))
                                     FROM (VALUES ('pending'), ('running'), ('sleeping'), ('waiting'), ('paused'),
                                                  ('failed'), ('canceled')) AS s), :now))
                 - :margin END AS horizon

-- delete_events_before --
-- One batch: the oldest broadcast events emitted before `horizon`, off events_by_emission (migration 0022).
DELETE FROM events
WHERE id IN (
    SELECT id FROM events INDEXED BY events_by_emission
    WHERE emitted_at < :horizon
    ORDER BY emitted_at
    LIMIT :limit
)

-- count_events_before --
SELECT count(*) AS n FROM events INDEXED BY events_by_emission WHERE emitted_at < :horizon

-- save_queue --
INSERT INTO queues (name, concurrency, worker_concurrency, rate_limit, rate_period, per_key_concurrency, updated_at)
VALUES (:name, :concurrency, :worker_concurrency, :rate_limit, :rate_period, :per_key_concurrency, :now)
ON CONFLICT (name) DO UPDATE
SET concurrency = excluded.concurrency, worker_concurrency = excluded.worker_concurrency,
    rate_limit = excluded.rate_limit, rate_period = excluded.rate_period,
    per_key_concurrency = excluded.per_key_concurrency, updated_at = excluded.updated_at

-- move_workflow_runs --
-- Before save_workflow_queue: a new or changed queue of a workflow takes its unfinished runs still in the queue
-- it had (see the PostgreSQL query save_workflow_queues).
UPDATE runs SET queue = :queue
WHERE workflow_name = :name AND version = :version
  AND queue = COALESCE((SELECT queue FROM workflow_queues WHERE workflow_name = :name AND version = :version),
                       'default')
  AND queue <> :queue
  AND status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')

-- workflow_queue --
SELECT queue FROM workflow_queues WHERE workflow_name = :name AND version = :version

-- save_workflow_queue --
INSERT INTO workflow_queues (workflow_name, version, queue) VALUES (:name, :version, :queue)
ON CONFLICT (workflow_name, version) DO UPDATE SET queue = excluded.queue

-- queue_stats --
-- See the PostgreSQL query of the same name.
WITH names AS (
    SELECT name FROM queues
    UNION
    SELECT DISTINCT queue FROM runs WHERE status IN ('pending', 'running', 'sleeping', 'waiting')
)
SELECT n.name, q.concurrency, q.worker_concurrency, q.rate_limit, q.rate_period, q.per_key_concurrency,
       (SELECT count(*) FROM runs r WHERE r.queue = n.name AND r.status = 'running' AND r.available_at > :now)
           AS running,
       (SELECT count(*) FROM runs r
        WHERE r.queue = n.name AND r.status IN ('pending', 'running', 'sleeping', 'waiting')
          AND r.available_at <= :now) AS due,
       (SELECT min(r.available_at) FROM runs r
        WHERE r.queue = n.name AND r.status IN ('pending', 'running', 'sleeping', 'waiting')
          AND r.available_at <= :now) AS oldest,
       CASE WHEN q.rate_limit IS NOT NULL THEN
           (SELECT count(*) FROM queue_starts s WHERE s.queue = n.name AND s.started_at > :now - q.rate_period)
       END AS starts,
       (SELECT count(*) FROM runs r
        WHERE r.queue = n.name AND r.key_parked AND r.status IN ('pending', 'running', 'sleeping', 'waiting'))
           AS parked
FROM names n
LEFT JOIN queues q ON q.name = n.name
ORDER BY n.name
