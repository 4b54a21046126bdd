-- The claim says which runs it took over, and from whom. A running run is due when its lease expired (its worker
-- died, stalled, or lost the database), and the claim took it over without a word: only runs.recoveries and the
-- take-overs metric told, and the previous holder's worker id was overwritten by the claim itself. Every claimed
-- run now comes back with `taken_from` (the worker id the run was leased to) and `lease_expired_at` (when that
-- lease ran out), both NULL unless the claim took the run over: exactly the runs whose recoveries it counts
-- (previous status 'running'). The worker logs them. The values are the candidate rows the claim reads and
-- locks anyway, handed to take_runs as it hands the previous status: two columns more per candidate, no read.
--
-- A function's result columns cannot change in place, and the previous release's workers read claim_runs'
-- twelve columns by position: the claim is restated under a new name, and claim_runs (both signatures) now
-- calls it and returns its first twelve columns, so those workers claim as before during a rolling deploy.

-- 0012's take_runs, returning the previous holder and lease of a run taken over.
CREATE FUNCTION take_runs(p_worker text, p_lease interval, p_now timestamptz, p_ids uuid[], p_previous text[],
                          p_first boolean[], p_holders text[], p_expiries timestamptz[])
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb, taken_from text, lease_expired_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE runs AS r
    SET status = 'running',
        lease_token = gen_random_uuid(),
        worker_id = p_worker,
        available_at = p_now + p_lease,
        started_at = COALESCE(r.started_at, p_now),
        recoveries = r.recoveries + CASE WHEN t.previous = 'running' THEN 1 ELSE 0 END,
        updated_at = p_now
    FROM unnest(p_ids, p_previous, p_first, p_holders, p_expiries) AS t(id, previous, first_claim, holder, expiry)
    WHERE r.id = t.id
    RETURNING r.id::text, r.workflow_name, r.version, r.input, r.attempts, r.recoveries, r.lease_token::text,
              p_now, t.first_claim, r.deadline_at, r.requested_action, r.trace_context,
              CASE WHEN t.previous = 'running' THEN t.holder END,
              CASE WHEN t.previous = 'running' THEN t.expiry END;
END
$$;

-- 0025's claim_runs, reading each candidate's worker and lease with its status and handing them to take_runs.
CREATE FUNCTION claim_runs_reporting_take_overs(p_worker text, p_queues text[], p_names text[],
                                                p_versions text[], p_limit integer, p_lease interval,
                                                p_held_tokens uuid[])
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb, taken_from text, lease_expired_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_queue text;
    v_limits queues%ROWTYPE;
    v_limited boolean;
    v_one_by_one boolean;
    v_now timestamptz;
    v_cap integer;
    v_budget integer;
    v_level bigint;
    v_taken integer := 0;
    v_count integer;
    v_holding boolean := false;  -- a queue lock is held: take no other one by waiting for it
    v_take uuid[];               -- the runs a pass takes, in order, and the status each had
    v_previous text[];
    v_first boolean[];
    v_holders text[];            -- and, for the runs still 'running' (a take-over), who held them until when
    v_expiries timestamptz[];
    v_keys text[];               -- their concurrency keys (a pass counts its own takes per key)
    v_park uuid[];
    v_starts integer;            -- pending runs among them: starts for the rate window
    v_parked_total integer := 0;
    v_ids uuid[];                -- a pass's candidates, in order: their status, first claim, key
    v_statuses text[];
    v_firsts boolean[];
    v_candidate_keys text[];
    v_candidate_holders text[];
    v_candidate_expiries timestamptz[];
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        EXIT WHEN v_taken >= p_limit;
        v_cap := p_limit - v_taken;
        v_budget := NULL;
        SELECT * INTO v_limits FROM queues WHERE name = v_queue;
        v_limited := FOUND AND (v_limits.concurrency IS NOT NULL OR v_limits.worker_concurrency IS NOT NULL
                                OR v_limits.rate_limit IS NOT NULL OR v_limits.per_key_concurrency IS NOT NULL);
        v_one_by_one := v_limited AND (v_limits.rate_limit IS NOT NULL OR v_limits.per_key_concurrency IS NOT NULL);
        IF v_limited THEN
            IF NOT v_holding THEN
                PERFORM pg_advisory_xact_lock(queue_lock_key(v_queue));
                v_holding := true;
            ELSIF NOT pg_try_advisory_xact_lock(queue_lock_key(v_queue)) THEN
                CONTINUE;
            END IF;
            v_now := clock_timestamp();
            IF v_limits.concurrency IS NOT NULL THEN
                SELECT v_limits.concurrency - count(*) INTO v_count FROM runs r
                WHERE r.queue = v_queue AND r.status = 'running'
                  AND (r.available_at > v_now OR r.lease_token = ANY (p_held_tokens));
                v_cap := least(v_cap, v_count);
            END IF;
            IF v_limits.worker_concurrency IS NOT NULL THEN
                SELECT v_limits.worker_concurrency - count(*) INTO v_count FROM runs r
                WHERE r.queue = v_queue AND r.status = 'running'
                  AND (r.available_at > v_now OR r.lease_token = ANY (p_held_tokens))
                  AND r.worker_id = p_worker;
                v_cap := least(v_cap, v_count);
            END IF;
            IF v_limits.rate_limit IS NOT NULL THEN
                DELETE FROM queue_starts s WHERE s.queue = v_queue AND s.started_at <= v_now - v_limits.rate_period;
                SELECT v_limits.rate_limit - count(*) INTO v_budget FROM queue_starts s WHERE s.queue = v_queue;
            END IF;
            IF v_limits.per_key_concurrency IS NOT NULL AND v_limits.swept_at < v_now - interval '5 seconds' THEN
                -- The safety net of the trigger (which skips a parked run locked at that moment): bring back
                -- the oldest parked run of every key with a free slot.
                UPDATE queues SET swept_at = v_now WHERE name = v_queue;
                UPDATE runs SET key_parked = false
                WHERE runs.id IN (
                    SELECT DISTINCT ON (p.concurrency_key) p.id
                    FROM runs p
                    WHERE p.queue = v_queue AND p.key_parked
                      AND p.status IN ('pending', 'running', 'sleeping', 'waiting')
                      AND (SELECT count(*) FROM runs x
                           WHERE x.queue = v_queue AND x.concurrency_key = p.concurrency_key
                             AND x.status = 'running'
                             AND (x.available_at > v_now OR x.lease_token = ANY (p_held_tokens)))
                          < v_limits.per_key_concurrency
                    ORDER BY p.concurrency_key, p.priority, p.available_at, p.id);
            END IF;
        ELSE
            v_now := now();
        END IF;
        CONTINUE WHEN v_cap <= 0;

        v_level := -2147483649;  -- below every integer priority
        LOOP
            -- The next priority level in use: one index probe per stream.
            SELECT min(head.priority) INTO v_level
            FROM unnest(p_names, p_versions) AS w(name, version)
            CROSS JOIN LATERAL (
                SELECT r.priority FROM runs r
                WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                  AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                  AND r.priority > v_level
                ORDER BY r.priority
                LIMIT 1
            ) AS head;
            EXIT WHEN v_level IS NULL;

            -- One statement reads a pass's candidates (locked, in (available_at, id) order). Without a per-key
            -- or rate limit they are all taken. Otherwise each is weighed in turn against its key and the rate
            -- budget; the runs taken are written together at the end of the pass, and so are the ones parked.
            -- Another pass follows only if some were parked (they left the index, so it reads further), never
            -- over the same runs again. At most 500 are parked per claim: one hot key's long backlog is set
            -- aside over several claims, each of a bounded cost.
            LOOP
                SELECT array_agg(d.id ORDER BY d.available_at, d.id),
                       array_agg(d.status ORDER BY d.available_at, d.id),
                       array_agg(d.started_at IS NULL ORDER BY d.available_at, d.id),
                       array_agg(d.concurrency_key ORDER BY d.available_at, d.id),
                       array_agg(d.worker_id ORDER BY d.available_at, d.id),
                       array_agg(d.available_at ORDER BY d.available_at, d.id)
                INTO v_ids, v_statuses, v_firsts, v_candidate_keys, v_candidate_holders, v_candidate_expiries
                FROM (
                    SELECT c.*
                    FROM unnest(p_names, p_versions) AS w(name, version)
                    CROSS JOIN LATERAL (
                        SELECT r.id, r.status, r.started_at, r.available_at, r.concurrency_key, r.worker_id
                        FROM runs r
                        WHERE r.queue = v_queue AND r.workflow_name = w.name AND r.version = w.version
                          AND r.priority = v_level
                          AND r.status IN ('pending', 'running', 'sleeping', 'waiting') AND NOT r.key_parked
                          AND r.available_at <= v_now
                          -- Not a run this worker is executing, whose lease only looks expired.
                          AND (r.status = 'running' AND r.lease_token = ANY (p_held_tokens)) IS NOT TRUE
                        ORDER BY r.available_at, r.id
                        LIMIT v_cap
                        FOR UPDATE SKIP LOCKED
                    ) AS c
                    ORDER BY c.available_at, c.id
                    -- All taken: as many as the cap. Weighed: every stream's candidates (some may be passed).
                    LIMIT CASE WHEN v_one_by_one THEN NULL ELSE v_cap END
                ) AS d;
                EXIT WHEN v_ids IS NULL;
                v_park := '{}';
                v_starts := 0;
                IF NOT v_one_by_one THEN
                    v_take := v_ids;
                    v_previous := v_statuses;
                    v_first := v_firsts;
                    v_holders := v_candidate_holders;
                    v_expiries := v_candidate_expiries;
                ELSE
                    v_take := '{}';
                    v_previous := '{}';
                    v_first := '{}';
                    v_holders := '{}';
                    v_expiries := '{}';
                    v_keys := '{}';
                    FOR i IN 1 .. cardinality(v_ids) LOOP
                        EXIT WHEN cardinality(v_take) >= v_cap OR v_parked_total >= 500;
                        CONTINUE WHEN v_statuses[i] = 'pending' AND v_budget IS NOT NULL AND v_starts >= v_budget;
                        IF v_limits.per_key_concurrency IS NOT NULL AND v_candidate_keys[i] IS NOT NULL THEN
                            SELECT count(*) INTO v_count FROM runs r
                            WHERE r.queue = v_queue AND r.concurrency_key = v_candidate_keys[i]
                              AND r.status = 'running'
                              AND (r.available_at > v_now OR r.lease_token = ANY (p_held_tokens));
                            v_count := v_count + cardinality(array_positions(v_keys, v_candidate_keys[i]));
                            IF v_count >= v_limits.per_key_concurrency THEN
                                v_park := v_park || v_ids[i];
                                v_parked_total := v_parked_total + 1;
                                CONTINUE;
                            END IF;
                        END IF;
                        v_take := v_take || v_ids[i];
                        v_previous := v_previous || v_statuses[i];
                        v_first := v_first || v_firsts[i];
                        v_holders := v_holders || v_candidate_holders[i];
                        v_expiries := v_expiries || v_candidate_expiries[i];
                        v_keys := v_keys || v_candidate_keys[i];
                        IF v_statuses[i] = 'pending' THEN
                            v_starts := v_starts + 1;
                        END IF;
                    END LOOP;
                    IF cardinality(v_park) > 0 THEN
                        UPDATE runs r SET key_parked = true WHERE r.id = ANY (v_park);
                    END IF;
                END IF;
                IF cardinality(v_take) > 0 THEN
                    RETURN QUERY SELECT * FROM take_runs(p_worker, p_lease, v_now, v_take, v_previous, v_first,
                                                         v_holders, v_expiries);
                    v_taken := v_taken + cardinality(v_take);
                    v_cap := v_cap - cardinality(v_take);
                    IF v_budget IS NOT NULL AND v_starts > 0 THEN
                        v_budget := v_budget - v_starts;
                        INSERT INTO queue_starts (queue, started_at)
                        SELECT v_queue, v_now FROM generate_series(1, v_starts);
                    END IF;
                END IF;
                EXIT WHEN cardinality(v_park) = 0 OR v_cap <= 0 OR v_parked_total >= 500;
            END LOOP;
            EXIT WHEN v_cap <= 0;
        END LOOP;
    END LOOP;
END
$$;

-- Planned once per session, as 0014 made the claim's.
ALTER FUNCTION claim_runs_reporting_take_overs(text, text[], text[], text[], integer, interval, uuid[])
    SET plan_cache_mode = force_generic_plan;

-- The previous release's claim: the same runs, without the two columns. Its own previous signature (0023)
-- calls this one with no tokens, as before.
CREATE OR REPLACE FUNCTION claim_runs(p_worker text, p_queues text[], p_names text[], p_versions text[],
                                      p_limit integer, p_lease interval, p_held_tokens uuid[])
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT c.id, c.workflow_name, c.version, c.input, c.attempts, c.recoveries, c.lease_token, c.claimed_at,
           c.first_claim, c.deadline_at, c.requested_action, c.trace_context
    FROM claim_runs_reporting_take_overs(p_worker, p_queues, p_names, p_versions, p_limit, p_lease,
                                         p_held_tokens) AS c;
END
$$;

-- No caller is left for 0014's take_runs.
DROP FUNCTION take_runs(text, interval, timestamptz, uuid[], text[], boolean[]);
