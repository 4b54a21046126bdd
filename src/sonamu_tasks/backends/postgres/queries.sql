-- Every query the PostgreSQL backend runs, by name. Parameters are always bound, never formatted in.
-- Tables are unqualified: each connection's search_path is the configured schema.

-- create_run --
-- Insert a pending run; a repeated id or idempotency key inserts nothing. Without a queue named, the run
-- goes to the queue its workflow registered (a producer need not have the definition). With `notify`, the
-- transaction also NOTIFYs its workflow's workers: only when no other NOTIFY of this process is in flight
-- (see 0013_notify_after_commit.sql), so at most one commit per process waits on the notification lock. The
-- notification names the run after its workflow (a unit separator between them, which no name holds): a worker
-- with a free slot takes it by its id (take_run), without a claim. Workers of earlier releases wake as for "a:".
WITH inserted AS (
    INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                      parent_id, parent_step, detached, trace_context, queue, priority, concurrency_key)
    VALUES (%(id)s, %(workflow_name)s, %(version)s, 'pending', %(input)s::jsonb, %(idempotency_key)s,
            COALESCE(%(start_at)s::timestamptz, now() + COALESCE(%(start_delay)s::interval, interval '0')),
            COALESCE(%(deadline_at)s::timestamptz, now() + %(deadline_delay)s::interval),
            %(parent_id)s::uuid, %(parent_step)s, %(detached)s, %(trace_context)s::jsonb,
            COALESCE(%(queue)s, (SELECT w.queue FROM workflow_queues w WHERE w.workflow_name = %(workflow_name)s AND w.version = %(version)s), 'default'),
            %(priority)s, %(concurrency_key)s)
    ON CONFLICT DO NOTHING
    RETURNING id::text AS id, workflow_name
), notified AS (
    SELECT pg_notify(%(channel)s::text, 'a:' || workflow_name || chr(31) || id) FROM inserted WHERE %(notify)s::boolean
)
SELECT id, (SELECT count(*) FROM notified) FROM inserted

-- create_debounced_run --
-- A debounced run: due `debounce` after the first run() of its key; a later run() with the key while it has
-- not started gives it the latest input instead of adding a run (created: false). No row when the run's own id
-- is taken: this call's earlier attempt inserted it and its answer was lost (the run may have started since,
-- leaving the debounce index, so the conflict below would not see it).
INSERT INTO runs (id, workflow_name, version, status, input, available_at, deadline_at, trace_context, queue,
                  priority, concurrency_key, debounce_key)
SELECT %(id)s, %(workflow_name)s, %(version)s, 'pending', %(input)s::jsonb, now() + %(debounce)s::interval,
       COALESCE(%(deadline_at)s::timestamptz, now() + %(deadline_delay)s::interval), %(trace_context)s::jsonb,
       COALESCE(%(queue)s, (SELECT w.queue FROM workflow_queues w WHERE w.workflow_name = %(workflow_name)s AND w.version = %(version)s), 'default'),
       %(priority)s, %(concurrency_key)s, %(debounce_key)s
WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = %(id)s::uuid)
ON CONFLICT (workflow_name, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'pending' AND started_at IS NULL
DO UPDATE SET input = EXCLUDED.input, updated_at = now()
RETURNING id::text, xmax = 0 AS created

-- create_claimed_run --
-- Insert a run claimed at once by the worker of the process that starts it: one commit instead of an
-- insert, a notification and a claim. A repeated id or idempotency key inserts nothing. A run of a queue
-- with limits is inserted pending instead (lease_token NULL): only the claim may weigh it against them.
-- The queue is always given (this process has the workflow's definition): no lookup of the workflow's queue,
-- whose folding away in custom plans made PostgreSQL plan this statement again at every call.
WITH target AS (
    SELECT %(queue)s::text AS queue
), placed AS (
    SELECT t.queue, EXISTS (
        SELECT 1 FROM queues q
        WHERE q.name = t.queue
          AND (q.concurrency IS NOT NULL OR q.worker_concurrency IS NOT NULL OR q.rate_limit IS NOT NULL
               OR q.per_key_concurrency IS NOT NULL)) AS limited
    FROM target t
)
INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                  lease_token, worker_id, started_at, parent_id, parent_step, detached, trace_context, queue,
                  priority, concurrency_key)
SELECT %(id)s, %(workflow_name)s, %(version)s, CASE WHEN limited THEN 'pending' ELSE 'running' END,
       %(input)s::jsonb, %(idempotency_key)s, CASE WHEN limited THEN now() ELSE now() + %(lease)s::interval END,
       COALESCE(%(deadline_at)s::timestamptz, now() + %(deadline_delay)s::interval),
       CASE WHEN limited THEN NULL ELSE gen_random_uuid() END, CASE WHEN limited THEN NULL ELSE %(worker_id)s END,
       CASE WHEN limited THEN NULL ELSE now() END, %(parent_id)s::uuid, %(parent_step)s, %(detached)s,
       %(trace_context)s::jsonb, queue, %(priority)s, %(concurrency_key)s
FROM placed
ON CONFLICT DO NOTHING
RETURNING id::text, workflow_name, version, input, attempts, recoveries, lease_token::text, now() AS claimed_at,
          true AS first_claim, deadline_at, requested_action, trace_context

-- create_runs --
-- Many pending runs in one statement: a run_many, or the run() calls of this process in flight together (one
-- commit for all of them). A repeated id or idempotency key inserts nothing for that item. `notify`: the
-- workflows whose workers this transaction wakes (empty when another NOTIFY of this process is in flight: see
-- create_run and 0013_notify_after_commit.sql); only when a run was inserted.
-- The batch comes as columns, not as one JSON object per run (whose parsing took a fifth of the statement):
-- `ids` a uuid[], `inputs` one JSON array (parsed once), and each other field either once for every run (the
-- scalar, e.g. `workflow_name`, its array NULL) or one per run (a JSON array, e.g. `workflow_names`, its
-- scalar NULL), so a run_many's shared options cost nothing per run. ROWS FROM zips the arrays (a NULL one
-- gives NULLs). When every run has the same workflow and version, their queue is looked up once (InitPlan).
WITH inserted AS (
    INSERT INTO runs (id, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,
                      parent_id, parent_step, detached, trace_context, queue, priority, concurrency_key)
    SELECT r.id, r.workflow_name, r.version, 'pending', r.input, r.idempotency_key,
           COALESCE(r.start_at, now() + make_interval(secs => COALESCE(r.start_delay, 0))),
           COALESCE(r.deadline_at, now() + make_interval(secs => r.deadline_delay)),
           r.parent_id, r.parent_step, r.detached, r.trace_context,
           COALESCE(r.queue,
                    CASE WHEN %(workflow_name)s::text IS NOT NULL AND %(version)s::text IS NOT NULL
                         THEN (SELECT w.queue FROM workflow_queues w
                               WHERE w.workflow_name = %(workflow_name)s AND w.version = %(version)s)
                         ELSE (SELECT w.queue FROM workflow_queues w
                               WHERE w.workflow_name = r.workflow_name AND w.version = r.version) END,
                    'default'),
           r.priority, r.concurrency_key
    FROM (
        SELECT e.id, e.input,
               COALESCE(e.workflow_name, %(workflow_name)s) AS workflow_name,
               COALESCE(e.version, %(version)s) AS version,
               COALESCE(e.idempotency_key, %(idempotency_key)s) AS idempotency_key,
               COALESCE(e.start_at::timestamptz, %(start_at)s::timestamptz) AS start_at,
               COALESCE(e.start_delay::float8, %(start_delay)s::float8) AS start_delay,
               COALESCE(e.deadline_at::timestamptz, %(deadline_at)s::timestamptz) AS deadline_at,
               COALESCE(e.deadline_delay::float8, %(deadline_delay)s::float8) AS deadline_delay,
               COALESCE(e.parent_id::uuid, %(parent_id)s::uuid) AS parent_id,
               COALESCE(e.parent_step, %(parent_step)s) AS parent_step,
               COALESCE(e.detached::boolean, %(detached)s::boolean, false) AS detached,
               COALESCE(e.trace_context::jsonb, %(trace_context)s::jsonb) AS trace_context,
               COALESCE(e.queue, %(queue)s) AS queue,
               COALESCE(e.priority::integer, %(priority)s::integer, 0) AS priority,
               COALESCE(e.concurrency_key, %(concurrency_key)s) AS concurrency_key
        FROM ROWS FROM (
            unnest(%(ids)s::uuid[]), jsonb_array_elements(%(inputs)s::jsonb),
            jsonb_array_elements_text(%(workflow_names)s::jsonb), jsonb_array_elements_text(%(versions)s::jsonb),
            jsonb_array_elements_text(%(idempotency_keys)s::jsonb),
            jsonb_array_elements_text(%(start_ats)s::jsonb), jsonb_array_elements_text(%(start_delays)s::jsonb),
            jsonb_array_elements_text(%(deadline_ats)s::jsonb), jsonb_array_elements_text(%(deadline_delays)s::jsonb),
            jsonb_array_elements_text(%(parent_ids)s::jsonb), jsonb_array_elements_text(%(parent_steps)s::jsonb),
            jsonb_array_elements_text(%(detacheds)s::jsonb), jsonb_array_elements_text(%(trace_contexts)s::jsonb),
            jsonb_array_elements_text(%(queues)s::jsonb), jsonb_array_elements_text(%(priorities)s::jsonb),
            jsonb_array_elements_text(%(concurrency_keys)s::jsonb))
        AS e(id, input, workflow_name, version, idempotency_key, start_at, start_delay, deadline_at, deadline_delay,
             parent_id, parent_step, detached, trace_context, queue, priority, concurrency_key)
    ) AS r
    ON CONFLICT DO NOTHING
    RETURNING id::text AS id
), notified AS (
    SELECT pg_notify(%(channel)s::text, 'a:' || name) FROM unnest(%(notify)s::text[]) AS name
)
SELECT id, (SELECT count(*) FROM notified) FROM inserted

-- notify_workers --
-- After the commit of runs made due now (0013_notify_after_commit.sql): wake the workers, one payload each
-- ("a:" or "w:" + workflow, see 0017_woken_runs_notify_urgently.sql). A transaction of its own that does not
-- wait for the WAL flush (a notification is not durable anyway), so PostgreSQL's notification queue lock is
-- held for microseconds, not for a flush.
SELECT set_config('synchronous_commit', 'off', true), pg_notify(%(channel)s, payload)
FROM unnest(%(payloads)s::text[]) AS payload

-- copy_runs_setup --
-- Before a run_many's COPY (copy_runs), in its transaction: the transaction's time, which the COPY's rows take
-- their start and deadline from as create_runs takes them from now(); the queue of runs that name none, as
-- create_runs looks it up; and whether a statement_timeout holds, which would count the time the client takes
-- to prepare the runs it streams. (The workers are told after the commit, by Wakeups: see _copy_runs.)
SELECT now(),
       COALESCE(%(queue)s::text,
                (SELECT w.queue FROM workflow_queues w
                 WHERE w.workflow_name = %(workflow_name)s AND w.version = %(version)s),
                'default'),
       current_setting('statement_timeout') NOT IN ('0', '0ms')

-- copy_runs --
-- A run_many's runs streamed in binary while the server inserts them: one statement, as create_runs, without its
-- parameters to build and parse, and the server's work overlaps the client's sending. No ON CONFLICT: only runs
-- without idempotency keys come this way, and a taken id (the batch sent again after its commit's answer was
-- lost) fails the whole COPY, which create_runs then resolves. The columns' order is the one of _copy_data: what
-- each run has of its own first, then what the runs of a run_many share.
COPY runs (id, input, concurrency_key, workflow_name, version, status, available_at, deadline_at, parent_id,
           parent_step, detached, trace_context, queue, priority)
FROM STDIN (FORMAT BINARY)

-- find_runs --
-- The runs a create_runs collided with: by idempotency key, or by id (a batch sent again after its commit's
-- answer was lost).
SELECT id::text, idempotency_key FROM runs WHERE idempotency_key = ANY(%(keys)s::text[]) OR id = ANY(%(ids)s::uuid[])

-- find_run_by_key --
-- The run a repeated create_run collided with.
SELECT id::text FROM runs WHERE idempotency_key = %(idempotency_key)s OR id = %(id)s

-- claim_runs --
-- Take up to `limit` due runs of the given workflows from the given queues, within every limit of those
-- queues: the function (claim_runs from migration 0012, named claim_runs_reporting_take_overs from 0027) reads
-- each queue's streams in priority order, a level at a time, so the cost does not grow with the backlog or with
-- sleeping runs; SKIP LOCKED lets concurrent claims pass each other. A running run under one of `held_tokens`
-- (this worker executes it) is never taken (migration 0023). A run taken over (its lease expired) comes with the
-- worker it was leased to and when that lease ran out, `taken_from` and `lease_expired_at`, NULL otherwise
-- (migration 0027).
-- A claim that took runs commits without waiting for the WAL flush (the set_config, evaluated per row
-- returned; a run's first step starts one flush sooner): the first durable write of a claimed run (a
-- checkpoint, its outcome) flushes the WAL up to itself, the claim with it. A crash that loses a claim not yet
-- flushed leaves the run due as before; writes under the lost token are fenced out, and a step it had started
-- runs again, as after any worker crash (steps run at least once).
SELECT c.*
FROM claim_runs_reporting_take_overs(%(worker_id)s, %(queues)s::text[], %(names)s::text[], %(versions)s::text[],
                                     %(limit)s, %(lease)s::interval, %(held_tokens)s::uuid[]) AS c
WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL

-- take_run --
-- Take one run by its id, as the notification of its insert named it (create_run), when it is pending and due
-- now, of one of the worker's streams and queues, in a queue without limits (only the claim weighs runs against
-- limits): an index probe and an update by the primary key, where a claim walks the worker's streams level by
-- level. No row when another worker took it first (its lock is skipped, as a claim skips it) or it is not
-- this statement's to take. Commits without waiting for the WAL flush, as the claim does (see claim_runs).
UPDATE runs AS r
SET status = 'running',
    lease_token = gen_random_uuid(),
    worker_id = %(worker_id)s,
    available_at = now() + %(lease)s::interval,
    started_at = COALESCE(r.started_at, now()),
    updated_at = now()
FROM (
    SELECT c.id, c.started_at IS NULL AS first_claim
    FROM runs c
    WHERE c.id = %(id)s::uuid AND c.status = 'pending' AND NOT c.key_parked AND c.available_at <= now()
      AND c.queue = ANY (%(queues)s::text[])
      AND (c.workflow_name, c.version) IN (SELECT * FROM unnest(%(names)s::text[], %(versions)s::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM queues q
          WHERE q.name = c.queue
            AND (q.concurrency IS NOT NULL OR q.worker_concurrency IS NOT NULL OR q.rate_limit IS NOT NULL
                 OR q.per_key_concurrency IS NOT NULL))
    FOR UPDATE SKIP LOCKED
) AS t
WHERE r.id = t.id AND set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries, r.lease_token::text,
          now() AS claimed_at, t.first_claim, r.deadline_at, r.requested_action, r.trace_context,
          NULL::text AS taken_from, NULL::timestamptz AS lease_expired_at

-- seconds_until_due --
-- How long until a claim of these queues and workflows could take a run (migration 0012); the runs under
-- `held_tokens` are not counted (migration 0023).
SELECT seconds_until_due(%(queues)s::text[], %(names)s::text[], %(versions)s::text[], %(held_tokens)s::uuid[])

-- heartbeat_runs --
-- Extend the leases this worker still holds; a missing token means the run was taken from it. The rows are
-- locked in id order, as the group commit locks them, so the two never deadlock.
WITH held AS (
    SELECT r.id FROM runs r
    WHERE (r.id, r.lease_token) IN (SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[]))
      AND r.status = 'running'
    ORDER BY r.id
    FOR NO KEY UPDATE
)
UPDATE runs
SET available_at = now() + %(lease)s::interval, updated_at = now()
FROM held
WHERE runs.id = held.id
RETURNING lease_token::text, requested_action

-- release_runs --
-- Hand runs back at once (graceful shutdown); the status trigger wakes the other workers. In their place: due
-- since their creation, so that a run started before others of its queue or key starts again before them (FIFO
-- goes by available_at; now() sent it behind every run of its key created while it ran). A cancel or pause
-- request the worker had not honoured yet is applied instead: canceled (the triggers cancel its children and
-- wake its waiters) or paused.
UPDATE runs
SET status = CASE requested_action WHEN 'cancel' THEN 'canceled' WHEN 'pause' THEN 'paused' ELSE 'pending' END,
    error = CASE WHEN requested_action = 'cancel' THEN %(canceled_error)s::jsonb ELSE error END,
    finished_at = CASE WHEN requested_action = 'cancel' THEN now() END,
    requested_action = NULL,
    available_at = LEAST(now(), created_at), lease_token = NULL, worker_id = NULL, updated_at = now()
WHERE (id, lease_token) IN (SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[]))
  AND status = 'running'

-- run_versions --
-- The workflow and version of each of these runs (the runs a call found by their idempotency keys): one read
-- for all of them.
SELECT id::text, workflow_name, version FROM runs WHERE id = ANY(%(ids)s::uuid[])

-- get_run --
SELECT id::text, workflow_name, version, status, input, output, error, attempts, recoveries, available_at,
       worker_id, idempotency_key, deadline_at, created_at, started_at, finished_at, updated_at,
       requested_action, parent_id::text, parent_step, detached, forked_from::text, forked_step, queue, priority, concurrency_key
FROM runs WHERE id = %(run_id)s

-- get_run_capped --
-- get_run for a page that shows at most `limit` characters of a value: an input or output whose JSON text is
-- longer comes as its first `limit` characters and its length (the *_excerpt and *_length columns) instead of
-- the value, so a page refreshing every second never reads a 50 MB output to show 20 kB of it. Each value is
-- turned into text once (OFFSET 0 keeps the planner from inlining `t` and converting it again at every use);
-- with a limit of 0 never: a value is only said to be there, by an empty excerpt without a length (a read of
-- another run's status, which shows none of its values).
SELECT r.id::text, r.workflow_name, r.version, r.status,
       CASE WHEN n.input <= %(limit)s THEN r.input END AS input,
       CASE WHEN n.output <= %(limit)s THEN r.output END AS output,
       r.error, r.attempts, r.recoveries, r.available_at, r.worker_id, r.idempotency_key, r.deadline_at,
       r.created_at, r.started_at, r.finished_at, r.updated_at, r.requested_action, r.parent_id::text,
       r.parent_step, r.detached, r.forked_from::text, r.forked_step, r.queue, r.priority, r.concurrency_key,
       CASE WHEN r.input IS NOT NULL AND (n.input IS NULL OR n.input > %(limit)s)
            THEN COALESCE(left(t.input, %(limit)s), '') END AS input_excerpt,
       n.input AS input_length,
       CASE WHEN r.output IS NOT NULL AND (n.output IS NULL OR n.output > %(limit)s)
            THEN COALESCE(left(t.output, %(limit)s), '') END AS output_excerpt,
       n.output AS output_length
FROM runs r,
     LATERAL (SELECT CASE WHEN %(limit)s > 0 THEN r.input::text END AS input,
                     CASE WHEN %(limit)s > 0 THEN r.output::text END AS output OFFSET 0) AS t,
     LATERAL (SELECT length(t.input) AS input, length(t.output) AS output OFFSET 0) AS n
WHERE r.id = %(run_id)s

-- load_steps_capped --
-- load_steps, with outputs cut as get_run_capped cuts a run's values; but a child step's output (the ids of
-- the children it started, which the page lists) always comes whole.
SELECT s.name, s.kind, s.status, CASE WHEN s.kind = 'child' OR n.output <= %(limit)s THEN s.output END AS output,
       s.error, s.attempts, s.wake_at, s.started_at, s.finished_at, s.waits_for,
       CASE WHEN s.kind <> 'child' AND s.output IS NOT NULL AND (n.output IS NULL OR n.output > %(limit)s)
            THEN COALESCE(left(t.output, %(limit)s), '') END AS output_excerpt,
       n.output AS output_length
FROM steps s,
     LATERAL (SELECT CASE WHEN %(limit)s > 0 AND s.kind <> 'child' THEN s.output::text END AS output OFFSET 0) AS t,
     LATERAL (SELECT length(t.output) AS output OFFSET 0) AS n
WHERE s.run_id = %(run_id)s
ORDER BY s.started_at, s.name

-- lock_children --
-- The children a parent is about to wait for, locked (in id order, as the group commit locks runs) until the
-- parent has parked: a child's finishing transaction waits for that, and its trigger then finds the parent
-- waiting and wakes it. A child that finished before is seen here: the parent does not wait at all.
SELECT status FROM runs
WHERE id = ANY(%(children)s::uuid[])
ORDER BY id
FOR SHARE

-- lock_parking_run --
-- The first statement of a park: the run's row, locked while the claim still owns it. A send to the run
-- updates this row too (to wake it), so it waits here until the park is decided, and a message sent before
-- is seen by the checks that follow.
SELECT created_at FROM runs
WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
FOR UPDATE

-- messages_waiting --
-- Whether one of the topics a parking run waits on has an unconsumed message.
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE run_id = %(run_id)s AND topic = ANY(%(topics)s::text[]) AND consumed_at IS NULL
)

-- lock_event --
-- Emits and parks on one (event, key) take turns: a park sees an emit that came first, or the emit finds the
-- park's event_waits row and wakes the run.
SELECT pg_advisory_xact_lock(hashtextextended(%(name)s || chr(31) || %(key)s, 0))

-- event_emitted --
-- The first event with this name and key emitted since the run was created (the database's clock).
SELECT payload FROM events
WHERE name = %(name)s AND key = %(key)s AND emitted_at >= %(since)s::timestamptz
ORDER BY emitted_at, id
LIMIT 1

-- park_run --
-- The run leaves its worker (no slot, no lease) until a wait is satisfied: the earliest timeout of its timed
-- waits (sleeps, receives, event waits), or a message, event or child it waits for ('waiting'). `ready`: one
-- of those arrived already, so it is due again at once. Timed waits are recorded as steps with their wake
-- times; event waits also in event_waits, where an emit finds them.
-- A cancel or pause stored before this statement (lock_parking_run holds the row since) and not yet heard of
-- by the worker is applied here, not at the wake time: canceled as a cancel of a parked run is (its children
-- with it, by the trigger; no event subscription), or paused keeping its wake time (due at once on resume
-- when it waits for an arrival, which cannot wake a paused run: as pause_run does).
WITH waits AS (
    SELECT name, kind, started_at, waits_for,
           COALESCE(wake_at, now() + make_interval(secs => seconds)) AS wake_at
    FROM json_to_recordset(%(waits)s::json) AS w(name text, kind text, started_at timestamptz, seconds float8,
                                                   wake_at timestamptz, waits_for jsonb)
), parked AS (
    UPDATE runs
    SET status = CASE requested_action WHEN 'cancel' THEN 'canceled' WHEN 'pause' THEN 'paused' ELSE
                      CASE WHEN %(ready)s THEN 'pending' WHEN %(waiting)s THEN 'waiting' ELSE 'sleeping' END END,
        available_at = CASE WHEN %(ready)s OR (requested_action = 'pause' AND %(waiting)s) THEN now()
                            -- a run with a deadline is due by it at the latest: claimed then, it fails
                            ELSE LEAST(COALESCE((SELECT min(wake_at) FROM waits), %(forever)s::timestamptz),
                                       deadline_at) END,
        error = CASE WHEN requested_action = 'cancel' THEN %(canceled_error)s::jsonb ELSE error END,
        finished_at = CASE WHEN requested_action = 'cancel' THEN now() END,
        requested_action = NULL,
        lease_token = NULL, worker_id = NULL, updated_at = now()
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    RETURNING id, status, available_at
), recorded AS (
    INSERT INTO steps (run_id, name, kind, status, wake_at, attempts, started_at, waits_for)
    SELECT parked.id, waits.name, waits.kind, CASE WHEN waits.kind = 'sleep' THEN 'sleeping' ELSE 'waiting' END,
           waits.wake_at, 1, waits.started_at, waits.waits_for
    FROM parked, waits
    ON CONFLICT (run_id, name) DO UPDATE SET wake_at = EXCLUDED.wake_at, status = EXCLUDED.status
), subscribed AS (
    INSERT INTO event_waits (run_id, name, key)
    SELECT parked.id, waits.waits_for->>'event', waits.waits_for->>'key'
    FROM parked, waits
    WHERE waits.kind = 'event' AND parked.status = 'waiting'
    ON CONFLICT DO NOTHING
)
SELECT status, available_at FROM parked

-- take_message --
-- receive: the oldest unconsumed message of the topic, consumed and checkpointed as the step's result in one
-- statement, only while the claim owns the run. Made again after a lost answer, it returns what the first
-- one took (the step is completed) instead of taking the next message. The message is looked up by run and
-- topic directly (the messages_unconsumed index), not through a join the planner could not use it for.
-- SKIP LOCKED: a message being taken by a stale attempt is left to it (its fence fails and it rolls back).
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), done AS (
    SELECT output FROM steps
    WHERE run_id = %(run_id)s AND name = %(name)s AND status = 'completed' AND EXISTS (SELECT 1 FROM owned)
), taken AS (
    UPDATE messages SET consumed_at = now(), consumed_by = %(name)s
    WHERE id = (SELECT m.id FROM messages m
                WHERE m.run_id = %(run_id)s AND m.topic = %(topic)s AND m.consumed_at IS NULL
                  AND EXISTS (SELECT 1 FROM owned) AND NOT EXISTS (SELECT 1 FROM done)
                ORDER BY m.id LIMIT 1
                FOR UPDATE SKIP LOCKED)
    RETURNING run_id, payload
), step AS (
    INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at, waits_for)
    SELECT run_id, %(name)s, 'receive', 'completed', payload, 1, %(started_at)s::timestamptz, now(),
           %(waits_for)s::jsonb
    FROM taken
    ON CONFLICT (run_id, name) DO UPDATE
    SET status = 'completed', output = EXCLUDED.output, finished_at = EXCLUDED.finished_at, wake_at = NULL
)
SELECT (SELECT count(*) FROM owned), (SELECT count(*) FROM taken) + (SELECT count(*) FROM done),
       COALESCE((SELECT payload FROM taken), (SELECT output FROM done))

-- take_event --
-- wait_for_event: the first matching event since the run was created, checkpointed as the step's result.
WITH owned AS (
    SELECT id, created_at FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), found AS (
    SELECT owned.id AS run_id, e.payload
    FROM owned CROSS JOIN LATERAL (
        SELECT payload FROM events
        WHERE name = %(event)s AND key = %(key)s AND emitted_at >= owned.created_at
        ORDER BY emitted_at, id
        LIMIT 1
    ) AS e
), step AS (
    INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at, waits_for)
    SELECT run_id, %(name)s, 'event', 'completed', payload, 1, %(started_at)s::timestamptz, now(),
           %(waits_for)s::jsonb
    FROM found
    ON CONFLICT (run_id, name) DO UPDATE
    SET status = 'completed', output = EXCLUDED.output, finished_at = EXCLUDED.finished_at, wake_at = NULL
), unsubscribed AS (
    DELETE FROM event_waits w USING found
    WHERE w.run_id = found.run_id AND w.name = %(event)s AND w.key = %(key)s
)
SELECT (SELECT count(*) FROM owned), (SELECT count(*) FROM found), (SELECT payload FROM found)

-- complete_wait --
-- A receive or event wait whose timeout passed: completed with None, only while the claim owns the run.
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), unsubscribed AS (
    DELETE FROM event_waits w USING owned WHERE w.run_id = owned.id AND %(kind)s = 'event'
      AND w.name = %(waits_for)s::jsonb->>'event' AND w.key = %(waits_for)s::jsonb->>'key'
)
INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at, waits_for)
SELECT id, %(name)s, %(kind)s, 'completed', 'null'::jsonb, 1, %(started_at)s::timestamptz, now(),
       %(waits_for)s::jsonb
FROM owned
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'completed', output = EXCLUDED.output, finished_at = EXCLUDED.finished_at, wake_at = NULL
RETURNING 1

-- set_run_event --
-- step.set_event: the latest value of the key, and the step record that makes a replay skip it, in one
-- statement while the claim owns the run; a get_event waiting in another process is notified.
WITH owned AS (
    SELECT id, notify_finish FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), published AS (
    INSERT INTO run_events (run_id, key, value, updated_at)
    SELECT id, %(key)s, %(value)s::jsonb, now() FROM owned
    ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
), recorded AS (
    INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
    SELECT id, %(name)s, 'set_event', 'completed', %(value)s::jsonb, 1, now(), now() FROM owned
    ON CONFLICT (run_id, name) DO NOTHING
), notified AS (
    SELECT pg_notify('sonamu_tasks:' || current_schema(), 'f:' || id::text)
    FROM owned WHERE notify_finish OR run_watched(id)
)
SELECT (SELECT count(*) FROM owned), (SELECT count(*) FROM notified)

-- send_message --
-- A message to a run: stored once per idempotency key; a waiting run is made due now. Updating the run's row
-- first orders this against a park (see lock_parking_run). The woken run's workers are told by this process
-- (0015_senders_notify_after_commit.sql): `woke` is its workflow; `notify`: this statement carries the NOTIFY,
-- "w:" as for any waiting run woken (0017_woken_runs_notify_urgently.sql). A completed run takes no message
-- (no receive would ever take it): a run that exists (`existing`) but was not updated is completed, if only
-- by a commit this statement waited for. A message of that key stored before (`prior`: a send made again after
-- a lost answer, a double click) is answered as a repeat, whatever the run has done since.
WITH deferred AS (
    SELECT set_config('sonamu_tasks.wake_after_commit', 'on', true) AS setting
), existing AS (
    SELECT id FROM runs WHERE id = %(run_id)s
), prior AS (
    SELECT 1 FROM messages WHERE run_id = %(run_id)s AND idempotency_key = %(idempotency_key)s
), target AS (
    UPDATE runs
    SET status = CASE WHEN status = 'waiting' THEN 'pending' ELSE status END,
        available_at = CASE WHEN status = 'waiting' THEN now() ELSE available_at END,
        updated_at = CASE WHEN status = 'waiting' THEN now() ELSE updated_at END
    FROM deferred
    WHERE id = %(run_id)s AND status <> 'completed'
    RETURNING id, CASE WHEN status = 'pending' AND updated_at = now() THEN workflow_name END AS woke  -- woken here
), stored AS (
    INSERT INTO messages (run_id, topic, payload, idempotency_key)
    SELECT id, %(topic)s, %(payload)s::jsonb, %(idempotency_key)s FROM target
    ON CONFLICT DO NOTHING
    RETURNING id
), notified AS (
    SELECT pg_notify(%(channel)s::text, 'w:' || woke) FROM target WHERE woke IS NOT NULL AND %(notify)s::boolean
)
SELECT (SELECT count(*) FROM existing), (SELECT count(*) FROM target), (SELECT count(*) FROM stored),
       (SELECT woke FROM target), (SELECT count(*) FROM notified), (SELECT count(*) FROM prior)

-- emit_event --
-- A broadcast event (after lock_event, in the same transaction): stored, and every run parked on it woken. The
-- woken runs' workers are told by this process, as for send_message: `woke` lists their workflows.
WITH deferred AS (
    SELECT set_config('sonamu_tasks.wake_after_commit', 'on', true) AS setting
), emitted AS (
    INSERT INTO events (name, key, payload) VALUES (%(name)s, %(key)s, %(payload)s::jsonb)
    RETURNING id
), subscribers AS (
    DELETE FROM event_waits WHERE name = %(name)s AND key = %(key)s
    RETURNING run_id
), woken AS (
    UPDATE runs SET status = 'pending', available_at = now(), updated_at = now()
    FROM deferred
    WHERE id IN (SELECT run_id FROM subscribers) AND status = 'waiting'
    RETURNING id, workflow_name
), notified AS (
    SELECT pg_notify(%(channel)s::text, 'w:' || name)
    FROM (SELECT DISTINCT workflow_name AS name FROM woken) AS w
    WHERE %(notify)s::boolean
)
SELECT (SELECT count(*) FROM woken), (SELECT array_agg(DISTINCT workflow_name) FROM woken),
       (SELECT count(*) FROM notified)

-- start_children --
-- A parent's step starts its children: the child runs and the parent's step record, in one statement,
-- only while the parent's claim owns it. A child that exists already (a replay) is left as it is.
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
), children AS (
    INSERT INTO runs (id, workflow_name, version, status, input, available_at, deadline_at, parent_id, parent_step,
                      detached, trace_context, queue, priority, concurrency_key)
    SELECT c.id, c.workflow_name, c.version, 'pending', c.input, now(),
           COALESCE(c.deadline_at, now() + make_interval(secs => c.deadline_delay)), owned.id, c.parent_step,
           c.detached, c.trace_context,
           COALESCE(c.queue, (SELECT w.queue FROM workflow_queues w
                              WHERE w.workflow_name = c.workflow_name AND w.version = c.version), 'default'),
           COALESCE(c.priority, 0), c.concurrency_key
    FROM owned, json_to_recordset(%(children)s::json)
         AS c(id uuid, workflow_name text, version text, input jsonb, parent_step text, detached boolean,
              trace_context jsonb, queue text, priority integer, concurrency_key text, deadline_at timestamptz,
              deadline_delay float8)
    ON CONFLICT DO NOTHING
), step AS (
    INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
    SELECT id, %(name)s, 'child', 'completed', %(output)s::jsonb, 1, %(started_at)s::timestamptz, now()
    FROM owned
    ON CONFLICT (run_id, name) DO NOTHING
)
SELECT count(*) FROM owned

-- count_children --
-- A run's children per status (the runs_by_parent index; no child's values are read).
SELECT status, count(*) FROM runs WHERE parent_id = %(run_id)s GROUP BY status

-- load_children --
-- A parent's children as they stand: what its waits on them need.
SELECT id::text, status, output, error FROM runs WHERE parent_id = %(run_id)s

-- complete_sleep --
WITH owned AS (
    SELECT id FROM runs
    WHERE id = %(run_id)s AND lease_token = %(lease_token)s AND status = 'running'
    FOR NO KEY UPDATE
)
UPDATE steps SET status = 'completed', finished_at = now()
FROM owned
WHERE steps.run_id = owned.id AND steps.name = %(name)s
RETURNING 1

-- write_runs --
-- The group commit: checkpoints and completions of several runs in one statement and one transaction. The
-- batch is one JSON array (one parameter). Each item is written only while its claim still owns the run;
-- the row lock orders it against a take-over. A row carries a step's checkpoint or the run's output
-- ("completes"); the rows of one run (its checkpoints, and the output when the workflow returned right after
-- them) are in one batch, so they are written together or not at all.
-- Returns the runs written.
WITH batch AS (
    SELECT *
    FROM json_to_recordset(%(batch)s::json)
         AS b(run_id uuid, lease_token uuid, step_name text, step_kind text, step_output jsonb,
              started_at timestamptz, finished_at timestamptz, completes boolean, output jsonb)
), owned AS (
    SELECT b.*
    FROM batch b JOIN runs r ON r.id = b.run_id
    WHERE r.lease_token = b.lease_token AND r.status = 'running'
    ORDER BY r.id
    FOR NO KEY UPDATE OF r
), checkpoints AS (
    INSERT INTO steps AS s (run_id, name, kind, status, output, attempts, started_at, finished_at)
    SELECT run_id, step_name, step_kind, 'completed', step_output, 1, started_at, finished_at
    FROM owned WHERE step_name IS NOT NULL
    ON CONFLICT (run_id, name) DO UPDATE
    SET status = 'completed', output = EXCLUDED.output, error = NULL, attempts = s.attempts + (s.kind <> 'child')::int,
        started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at
), completions AS (
    UPDATE runs AS r
    SET status = 'completed', output = o.output, error = NULL, lease_token = NULL, finished_at = now(),
        requested_action = NULL, updated_at = now()
    FROM owned o
    WHERE r.id = o.run_id AND o.completes
)
SELECT run_id::text FROM owned

-- record_step_failure --
-- Runs in the same transaction as retry_run/fail_run, after it has checked the lease.
INSERT INTO steps AS s (run_id, name, kind, status, error, attempts, started_at, finished_at)
VALUES (%(run_id)s, %(name)s, 'call', 'failed', %(error)s::jsonb, 1, %(started_at)s::timestamptz, now())
ON CONFLICT (run_id, name) DO UPDATE
SET status = 'failed', error = EXCLUDED.error, attempts = s.attempts + 1,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at

-- register_worker --
INSERT INTO workers (id, host, pid, workflows, concurrency, queues)
VALUES (%(id)s, %(host)s, %(pid)s, %(workflows)s::jsonb, %(concurrency)s, %(queues)s::jsonb)
ON CONFLICT (id) DO UPDATE
SET workflows = EXCLUDED.workflows, concurrency = EXCLUDED.concurrency, queues = EXCLUDED.queues,
    heartbeat_at = now()

-- upsert_schedule --
-- A changed expression or timezone restarts the schedule from the new next fire; an unchanged one keeps
-- its place, so a restart at the fire moment skips nothing.
INSERT INTO schedules AS s (name, workflow_name, version, expression, timezone, input, next_fire_at)
VALUES (%(name)s, %(workflow_name)s, %(version)s, %(expression)s, %(timezone)s, %(input)s::jsonb,
        %(next_fire_at)s::timestamptz)
ON CONFLICT (name) DO UPDATE
SET workflow_name = EXCLUDED.workflow_name, version = EXCLUDED.version, input = EXCLUDED.input,
    expression = EXCLUDED.expression, timezone = EXCLUDED.timezone,
    next_fire_at = CASE WHEN (s.expression, s.timezone) = (EXCLUDED.expression, EXCLUDED.timezone)
                        THEN s.next_fire_at ELSE EXCLUDED.next_fire_at END,
    updated_at = now()

-- advance_schedule --
-- Compare-and-set on next_fire_at: of the workers that read the same due time, exactly one advances it. A row
-- another transaction holds is skipped, not waited for: a worker is firing it, and one stuck between this
-- update and its commit (a paused VM, a half-open connection) must not stall the other schedules' fires.
-- The version becomes the one this fire runs (workers of several releases may fire a schedule).
UPDATE schedules AS s
SET next_fire_at = %(next_fire_at)s, last_fire_at = %(fire_at)s, last_run_id = %(run_id)s,
    version = COALESCE(%(version)s::text, s.version), updated_at = now()
FROM (SELECT name FROM schedules WHERE name = %(name)s AND next_fire_at = %(expected)s
      FOR UPDATE SKIP LOCKED) AS due
WHERE s.name = due.name
RETURNING s.name

-- delete_schedule --
-- A stored schedule deleted by hand (its workflow left the code, so no worker synchronizes it away): only while
-- it is still this workflow's (a worker storing the name for another workflow meanwhile keeps its own), and only
-- if no live worker registers the workflow, by the database's clock (a worker registers before it stores its
-- schedules, so one that stored this one since is seen). Returns (deleted, a live worker registers it).
WITH live AS (
    SELECT 1 FROM workers w
    WHERE w.heartbeat_at > now() - make_interval(secs => %(stale_after)s)
      AND EXISTS (SELECT 1 FROM jsonb_array_elements(w.workflows) AS e WHERE e ->> 0 = %(workflow_name)s)
    LIMIT 1
), deleted AS (
    DELETE FROM schedules
    WHERE name = %(name)s AND workflow_name = %(workflow_name)s AND NOT EXISTS (SELECT 1 FROM live)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM deleted), EXISTS (SELECT 1 FROM live)

-- delete_stale_schedules --
-- Schedules of these workflows that the code no longer declares.
DELETE FROM schedules
WHERE workflow_name = ANY(%(workflows)s::text[]) AND NOT (name = ANY(%(keep)s::text[]))

-- list_schedules --
SELECT name, workflow_name, version, expression, timezone, input, next_fire_at, last_fire_at,
       last_run_id::text
FROM schedules ORDER BY name

-- list_runs --
-- Newest first; keyset pagination on the time-ordered id, so page N costs what page 1 costs. With a
-- `value_limit`, inputs and outputs longer than that many characters come cut, as get_run_capped cuts them
-- (0: none read, what a runs list shows): the list a dashboard refreshes every second does not read 50 inputs
-- of 2 MB each. NULL: whole values. The page is chosen first (`r`), so that only its runs' values are measured.
-- Planned for the filters given, never prepared (backend.py): the planner drops each "IS NULL OR" and reads the
-- index the remaining filters fit (by workflow, by workflow and status, by status, by parent). `above_id` bounds
-- the id (the cursor, and created_before widened by a margin: RunQuery.above_id), so the scan starts where the
-- times do; created_at stays the exact filter.
SELECT r.id::text, r.workflow_name, r.version, r.status,
       CASE WHEN %(value_limit)s::integer IS NULL OR n.input <= %(value_limit)s THEN r.input END AS input,
       CASE WHEN %(value_limit)s::integer IS NULL OR n.output <= %(value_limit)s THEN r.output END AS output,
       r.error, r.attempts, r.recoveries, r.available_at, r.worker_id, r.idempotency_key, r.deadline_at,
       r.created_at, r.started_at, r.finished_at, r.updated_at, r.requested_action, r.parent_id::text,
       r.parent_step, r.detached, r.forked_from::text, r.forked_step, r.queue, r.priority, r.concurrency_key,
       CASE WHEN %(value_limit)s::integer IS NOT NULL AND r.input IS NOT NULL
                 AND (n.input IS NULL OR n.input > %(value_limit)s)
            THEN COALESCE(left(t.input, %(value_limit)s), '') END AS input_excerpt,
       n.input AS input_length,
       CASE WHEN %(value_limit)s::integer IS NOT NULL AND r.output IS NOT NULL
                 AND (n.output IS NULL OR n.output > %(value_limit)s)
            THEN COALESCE(left(t.output, %(value_limit)s), '') END AS output_excerpt,
       n.output AS output_length
FROM (SELECT * FROM runs
      WHERE (%(workflow)s::text IS NULL OR workflow_name = %(workflow)s::text)
        AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
        AND (%(above_id)s::uuid IS NULL OR id < %(above_id)s::uuid)
        AND (%(parent_id)s::uuid IS NULL OR parent_id = %(parent_id)s::uuid)
        AND (%(version)s::text IS NULL OR version = %(version)s::text)
        AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
        AND (%(created_after)s::timestamptz IS NULL OR created_at >= %(created_after)s::timestamptz)
        AND (%(created_before)s::timestamptz IS NULL OR created_at < %(created_before)s::timestamptz)
      ORDER BY runs.id DESC
      LIMIT %(limit)s) AS r,
     LATERAL (SELECT CASE WHEN %(value_limit)s > 0 THEN r.input::text END AS input,
                     CASE WHEN %(value_limit)s > 0 THEN r.output::text END AS output OFFSET 0) AS t,
     LATERAL (SELECT length(t.input) AS input, length(t.output) AS output OFFSET 0) AS n
ORDER BY r.id DESC

-- unfinished_by_version --
-- Unfinished runs per (workflow, version, status), with the oldest's creation: what `runs --stranded`
-- compares with the versions live workers register.
SELECT workflow_name, version, status, count(*), min(created_at)
FROM runs
WHERE status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')
GROUP BY workflow_name, version, status
ORDER BY workflow_name, version, status

-- fork_steps --
-- A fork's new run gets the source's checkpoints of these steps, as they are.
INSERT INTO steps (run_id, name, kind, status, output, error, attempts, wake_at, started_at, finished_at, waits_for)
SELECT %(new_id)s::uuid, name, kind, status, output, error, attempts, wake_at, started_at, finished_at, waits_for
FROM steps
WHERE run_id = %(source_id)s::uuid AND name = ANY(%(names)s::text[])

-- pause_run --
-- Running under a live lease: at its next step boundary. Otherwise paused at once (it is not claimed until
-- resumed), a run whose worker's lease expired included (see cancel_run: its lease token is cleared, so a
-- stalled worker is shut out). A waiting run is due at once when resumed: it replays and waits again for what
-- has not happened yet.
UPDATE runs
SET status = CASE WHEN status = 'running' AND available_at > now() THEN status ELSE 'paused' END,
    requested_action = CASE WHEN status = 'running' AND available_at > now() THEN 'pause' END,
    available_at = CASE WHEN status = 'waiting' THEN now() ELSE available_at END,
    lease_token = CASE WHEN status = 'running' AND available_at > now() THEN lease_token END,
    worker_id = CASE WHEN status = 'running' AND available_at > now() THEN worker_id END,
    updated_at = now()
WHERE id = %(run_id)s AND status IN ('pending', 'running', 'sleeping', 'waiting')
  AND requested_action IS DISTINCT FROM 'cancel'
RETURNING status

-- watch_runs --
-- result() and get_event waiters in another process ask for the "finished" notification of these runs (the
-- waiters of one process in flight together share this statement). A row with busy false: that run is
-- unfinished and now watched (the waiter need not read it until notified). busy true: a finish holds the run's
-- stripe and the run is not watched; it is asked again shortly. No row: finished, unknown or watched already (the
-- waiter reads the run). It waits for no lock, and takes none on `runs`: a claim meeting the watch of a run it is
-- about to take takes it (migrations 0031, 0032).
SELECT run_id, busy FROM watch_runs(%(run_ids)s::uuid[])

-- no_jit --
-- For the rest of this transaction, no JIT compilation. The statistics below count every unfinished run, so
-- with some 50,000 of them their plan costs more than jit_above_cost, and PostgreSQL spent 0.5 to 1 s
-- compiling a query that executes in 0.1 s, on every refresh of the queues page. LOCAL: it ends with the
-- transaction, so it holds through a pooler in transaction mode and never stays on a pooled connection.
SET LOCAL jit = off

-- due_backlog --
-- Runs due and not claimed, per queue and workflow, and how long the oldest has waited (for the metrics).
SELECT queue, workflow_name, version, count(*), EXTRACT(EPOCH FROM now() - min(available_at))::float8
FROM runs
WHERE status IN ('pending', 'running', 'sleeping', 'waiting') AND available_at <= now()
GROUP BY queue, workflow_name, version

-- fail_overdue_runs --
-- Up to `limit` pending runs whose deadline passed, failed as a claim fails them (attempt.py's DeadlineExceeded,
-- then fail_run): the same error type and message, one attempt counted. Whatever their workflow, version or
-- queue: a run no worker claims (a version no live worker serves, a queue whose slots are full) fails at its
-- deadline all the same. A paused run is not failed (resumed, it is pending again and fails then). A pending run
-- holds no slot of its queue or key; one parked behind its key leaves the parked set. SKIP LOCKED: a run a claim
-- is taking at this moment is left to the claim (which fails it as well), and nothing waits. Reads runs_overdue
-- (migration 0024): with nothing overdue, one probe of an empty range. The status triggers do the rest, as for any
-- failed run: a waiting parent is woken, a watching result() is notified. A run with a concurrency key may have
-- been handed its key's slot (un-parked by the trigger as the key's last run left 'running'): the backend then
-- un-parks its queue (unpark_queue), or the key's next run would wait for the claim's sweep.
WITH overdue AS (
    SELECT id FROM runs
    WHERE status = 'pending' AND deadline_at IS NOT NULL AND deadline_at <= now()
    ORDER BY deadline_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE runs r
SET status = 'failed', attempts = r.attempts + 1,
    error = jsonb_build_object(
        'type', 'DeadlineExceeded',
        'message', 'deadline exceeded: run ' || r.id::text || ' was due by '
                   || to_char(r.deadline_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
    lease_token = NULL, worker_id = NULL, requested_action = NULL, key_parked = false,
    finished_at = now(), updated_at = now()
FROM overdue
WHERE r.id = overdue.id AND r.status = 'pending'
RETURNING r.id::text, r.workflow_name, r.version, r.parent_id::text, r.queue, r.concurrency_key

-- save_retention --
-- The retention each workflow version registered here declares (seconds; NULL: the default applies), for
-- whichever worker deletes expired runs. One row per (workflow, version): a worker replaces only the versions it
-- declares, never another version's row. An unchanged row is not rewritten; the rows come sorted, so two workers
-- storing the same versions at once lock them in the same order.
INSERT INTO workflow_version_retention AS w (workflow_name, version, seconds)
SELECT p.name, p.version, p.seconds
FROM json_to_recordset(%(policies)s::json) AS p(name text, version text, seconds float8)
ON CONFLICT (workflow_name, version) DO UPDATE SET seconds = EXCLUDED.seconds, updated_at = now()
WHERE w.seconds IS DISTINCT FROM EXCLUDED.seconds

-- try_retention_lock --
-- Held by the one worker deleting expired runs, for as long as its session lasts (a dedicated connection).
SELECT pg_try_advisory_lock(hashtextextended('sonamu_tasks:retention:' || current_schema(), 0))

-- delete_finished_runs --
-- One batch of retention: the oldest finished runs (of `statuses`) of one workflow that finished more than
-- `older_than` ago, deleted with their steps, messages, events and event waits (ON DELETE CASCADE). Never an
-- unfinished run; never a child whose parent is unfinished or finished more recently (the parent may still read
-- the child's outcome). They are read off runs_finished_by_workflow, that workflow's runs only, oldest first, up
-- to the limit (migration 0026). SKIP LOCKED: a row another transaction holds is left for the next batch, and
-- nothing waits on a claim. One statement, so no transaction stays open between round trips. Its commit does not
-- wait for the WAL flush (synchronous_commit off for this transaction): a deletion lost to a crash right after it
-- is only made again by a later batch. Returns how many runs were deleted.
WITH relaxed AS (
    SELECT set_config('synchronous_commit', 'off', true) AS setting
), expired AS (
    SELECT r.id
    FROM runs r
    WHERE r.workflow_name = %(workflow)s::text
      AND r.status IN ('completed', 'failed', 'canceled')
      AND r.status = ANY(%(statuses)s::text[])
      AND r.finished_at < now() - %(older_than)s::interval
      AND NOT EXISTS (
          SELECT 1 FROM runs p
          WHERE p.id = r.parent_id
            AND (p.status NOT IN ('completed', 'failed', 'canceled')
                 OR p.finished_at >= now() - %(older_than)s::interval))
    ORDER BY r.finished_at
    LIMIT %(limit)s
    FOR UPDATE OF r SKIP LOCKED
), deleted AS (
    DELETE FROM runs WHERE id IN (SELECT id FROM expired)
    RETURNING 1
)
SELECT (SELECT count(*) FROM deleted), (SELECT setting FROM relaxed)

-- count_finished_runs --
-- What delete_finished_runs would delete, all batches together (purge --dry-run, and its progress bar).
SELECT count(*)
FROM runs r
WHERE r.workflow_name = %(workflow)s::text
  AND r.status IN ('completed', 'failed', 'canceled')
  AND r.status = ANY(%(statuses)s::text[])
  AND r.finished_at < now() - %(older_than)s::interval
  AND NOT EXISTS (
      SELECT 1 FROM runs p
      WHERE p.id = r.parent_id
        AND (p.status NOT IN ('completed', 'failed', 'canceled')
             OR p.finished_at >= now() - %(older_than)s::interval))

-- finished_workflows --
-- The names of the workflows that have finished runs, in order: one probe of runs_finished_by_workflow per name
-- (a loose index scan), however many runs each has. Retention deletes the runs of one of them at a time.
WITH RECURSIVE names AS (
    SELECT (SELECT workflow_name FROM runs
            WHERE status IN ('completed', 'failed', 'canceled')
            ORDER BY workflow_name LIMIT 1) AS name
    UNION ALL
    SELECT (SELECT r.workflow_name FROM runs r
            WHERE r.status IN ('completed', 'failed', 'canceled') AND r.workflow_name > names.name
            ORDER BY r.workflow_name LIMIT 1)
    FROM names
    WHERE names.name IS NOT NULL
)
SELECT name FROM names WHERE name IS NOT NULL

-- unreachable_events_horizon --
-- The emission time before which no stored run can read a broadcast event (wait_for_event takes the first one
-- emitted at or after the run's creation): the creation of the oldest run that is not completed, or now, less
-- `margin`. A failed or canceled run counts: a retry starts it again, with its created_at. The margin covers a
-- run whose insert began before this statement and commits after it (its created_at is its transaction's start,
-- and this statement does not see it). NULL when no event is that old: one probe of events_by_emission, and the
-- runs are not read (PostgreSQL evaluates the subquery only when the CASE needs it).
-- The oldest run of each status is its first by id (runs_by_status: one index probe per status, however many
-- failed runs are kept), its id being time-ordered by its client's clock: clients within the margin of the
-- database's clock (as created_before assumes) find the oldest creation, or one as old within the margin.
WITH oldest AS (
    SELECT min(emitted_at) AS emitted_at FROM events
)
SELECT CASE WHEN oldest.emitted_at < now() - %(margin)s::interval
            THEN LEAST(now(), (SELECT min(first.created_at)
                               FROM unnest(ARRAY['pending', 'running', 'sleeping', 'waiting', 'paused', 'failed',
                                                 'canceled']) AS s(status)
                               CROSS JOIN LATERAL (
                                   SELECT r.created_at FROM runs r WHERE r.status = s.status ORDER BY r.id LIMIT 1
                               ) AS first))
                 - %(margin)s::interval END
FROM oldest

-- delete_events_before --
-- One batch: the oldest broadcast events emitted before `horizon`, off events_by_emission (migration 0029).
-- SKIP LOCKED and one statement, as delete_finished_runs (an emit only inserts: nothing waits on these rows); its
-- commit does not wait for the WAL flush either. Returns how many were deleted.
WITH relaxed AS (
    SELECT set_config('synchronous_commit', 'off', true) AS setting
), doomed AS (
    SELECT id FROM events
    WHERE emitted_at < %(horizon)s::timestamptz
    ORDER BY emitted_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM events WHERE id IN (SELECT id FROM doomed)
    RETURNING 1
)
SELECT (SELECT count(*) FROM deleted), (SELECT setting FROM relaxed)

-- count_events_before --
-- What delete_events_before would delete, all batches together (purge --dry-run, and its progress bar).
SELECT count(*) FROM events WHERE emitted_at < %(horizon)s::timestamptz

-- lock_queue --
-- Taken before a queue's limits change: the change waits for a claim of the queue in progress (see
-- migration 0012 for the lock's rules).
SELECT pg_advisory_xact_lock(queue_lock_key(%(name)s))

-- save_queue --
-- A queue's limits as declared in code; a change is seen by the next claim of every worker. Returns whether
-- the per-key limit changed (its parked runs are then let back into the claim, see unpark_queue).
WITH previous AS (
    SELECT per_key_concurrency FROM queues WHERE name = %(name)s
), saved AS (
    INSERT INTO queues AS q (name, concurrency, worker_concurrency, rate_limit, rate_period, per_key_concurrency)
    VALUES (%(name)s, %(concurrency)s, %(worker_concurrency)s, %(rate_limit)s, %(rate_period)s::interval,
            %(per_key_concurrency)s)
    ON CONFLICT (name) DO UPDATE
    SET concurrency = EXCLUDED.concurrency, worker_concurrency = EXCLUDED.worker_concurrency,
        rate_limit = EXCLUDED.rate_limit, rate_period = EXCLUDED.rate_period,
        per_key_concurrency = EXCLUDED.per_key_concurrency, updated_at = now()
    WHERE (q.concurrency, q.worker_concurrency, q.rate_limit, q.rate_period, q.per_key_concurrency)
          IS DISTINCT FROM (EXCLUDED.concurrency, EXCLUDED.worker_concurrency, EXCLUDED.rate_limit,
                            EXCLUDED.rate_period, EXCLUDED.per_key_concurrency)
    RETURNING per_key_concurrency
)
SELECT EXISTS (SELECT 1 FROM saved)
       AND (SELECT per_key_concurrency FROM saved) IS DISTINCT FROM (SELECT per_key_concurrency FROM previous)

-- save_workflow_queues --
-- The queue each registered (workflow, version) declares, for runs started by name elsewhere. When it is new
-- or changed, the workflow's unfinished runs still in the queue it had (the default queue when none: runs
-- started by name before any worker registered it) move to it, so they fall under its limits and its
-- workers.
WITH incoming AS (
    SELECT p.name, p.version, p.queue
    FROM json_to_recordset(%(workflows)s::json) AS p(name text, version text, queue text)
), changed AS (
    SELECT i.name, i.version, i.queue, COALESCE(w.queue, 'default') AS previous
    FROM incoming i
    LEFT JOIN workflow_queues w ON w.workflow_name = i.name AND w.version = i.version
    WHERE w.queue IS DISTINCT FROM i.queue
), saved AS (
    INSERT INTO workflow_queues AS w (workflow_name, version, queue)
    SELECT name, version, queue FROM changed
    ON CONFLICT (workflow_name, version) DO UPDATE SET queue = EXCLUDED.queue
)
UPDATE runs r SET queue = c.queue
FROM changed c
WHERE r.workflow_name = c.name AND r.version = c.version AND r.queue = c.previous AND c.queue <> c.previous
  AND r.status IN ('pending', 'running', 'sleeping', 'waiting', 'paused')

-- queue_stats --
-- Every queue with limits or unfinished runs: its limits, runs executing (live lease), due runs not claimed
-- and the oldest one's wait, starts in the current rate window, runs parked behind a full key. Counts over
-- unfinished runs only (the claim and executing indexes).
WITH names AS (
    SELECT name FROM queues
    UNION
    SELECT DISTINCT queue FROM runs WHERE status IN ('pending', 'running', 'sleeping', 'waiting')
)
SELECT n.name, q.concurrency, q.worker_concurrency, q.rate_limit, q.rate_period, q.per_key_concurrency,
       (SELECT count(*) FROM runs r WHERE r.queue = n.name AND r.status = 'running' AND r.available_at > now()),
       due.count, EXTRACT(EPOCH FROM now() - due.oldest)::float8,
       CASE WHEN q.rate_limit IS NOT NULL THEN
           (SELECT count(*) FROM queue_starts s WHERE s.queue = n.name AND s.started_at > now() - q.rate_period)
       END,
       (SELECT count(*) FROM runs r
        WHERE r.queue = n.name AND r.key_parked AND r.status IN ('pending', 'running', 'sleeping', 'waiting'))
FROM names n
LEFT JOIN queues q ON q.name = n.name
CROSS JOIN LATERAL (
    SELECT count(*) AS count, min(r.available_at) AS oldest FROM runs r
    WHERE r.queue = n.name AND r.status IN ('pending', 'running', 'sleeping', 'waiting')
      AND r.available_at <= now()  -- a 'running' one here lost its lease: due again
) AS due
ORDER BY n.name

-- migrations_table --
-- Whether the schema has its migrations table, read from the catalog: a read-only start checks the schema
-- without creating it, and the schema may not exist at all. With whether this role may use the schema and read
-- the table (NULL where there is nothing to ask about), and the role: a missing grant is said as one, not as a
-- table that is not there (the schema is left out of the search path without USAGE).
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = %(schema)s AND tablename = 'migrations'),
       (SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_catalog.pg_namespace n WHERE n.nspname = %(schema)s),
       (SELECT has_table_privilege(c.oid, 'SELECT')
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relname = 'migrations'),
       current_user

-- applied_migrations --
-- The migrations recorded in the schema: what migrate applies the rest of, and a read-only start compares with
-- this release's.
SELECT name FROM migrations
