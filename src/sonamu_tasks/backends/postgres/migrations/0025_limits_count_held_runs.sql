-- A queue's limits count the runs this worker holds as executing. The claim's counts (the queue's concurrency,
-- worker_concurrency, a key's per_key_concurrency, and the periodic sweep of parked keys) took a run as
-- executing only while its lease looked live, and 0023 made the claim skip a run this worker holds whose lease
-- only looks expired (a heartbeat answered late): skipped, and not counted either, its slot was handed to
-- another run. Queue("one", concurrency=1) then ran two at once for the whole length of the first run. A run
-- under one of the held tokens now counts, whatever its lease says. Across workers the lease is still the only
-- signal: another worker's run whose lease expired is presumed dead and frees its slot.
--
-- 0023's claim_runs with the held tokens counted; the same signature, so the previous release's overload
-- (which calls it with no tokens) is unchanged. The counts read runs_executing as before (available_at was a
-- filter there, not a bound of the index).

CREATE OR REPLACE FUNCTION claim_runs(p_worker text, p_queues text[], p_names text[], p_versions text[],
                                      p_limit integer, p_lease interval, p_held_tokens uuid[])
RETURNS TABLE (id text, workflow_name text, version text, input jsonb, attempts integer, recoveries integer,
               lease_token text, claimed_at timestamptz, first_claim boolean, deadline_at timestamptz,
               requested_action text, trace_context jsonb)
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
    v_keys text[];               -- their concurrency keys (a pass counts its own takes per key)
    v_park uuid[];
    v_starts integer;            -- pending runs among them: starts for the rate window
    v_parked_total integer := 0;
    v_ids uuid[];                -- a pass's candidates, in order: their status, first claim, key
    v_statuses text[];
    v_firsts boolean[];
    v_candidate_keys text[];
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
                       array_agg(d.concurrency_key ORDER BY d.available_at, d.id)
                INTO v_ids, v_statuses, v_firsts, v_candidate_keys
                FROM (
                    SELECT c.*
                    FROM unnest(p_names, p_versions) AS w(name, version)
                    CROSS JOIN LATERAL (
                        SELECT r.id, r.status, r.started_at, r.available_at, r.concurrency_key FROM runs r
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
                ELSE
                    v_take := '{}';
                    v_previous := '{}';
                    v_first := '{}';
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
                    RETURN QUERY SELECT * FROM take_runs(p_worker, p_lease, v_now, v_take, v_previous, v_first);
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

-- CREATE OR REPLACE resets the function's settings: planned once per session again, as 0014 made the claim's.
ALTER FUNCTION claim_runs(text, text[], text[], text[], integer, interval, uuid[])
    SET plan_cache_mode = force_generic_plan;
