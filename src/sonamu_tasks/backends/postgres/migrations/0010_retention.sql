-- Retention: finished runs are deleted once they are older than their workflow's retention (or the
-- default), in small batches, with their steps, messages, published events and event waits (ON DELETE
-- CASCADE, 0001 and 0008).
--
-- runs_finished holds only finished runs, by finish time: a deletion batch reads the oldest first and stops
-- at its limit, however many runs are unfinished or recent. messages_by_run lets a deleted run's cascade find
-- its messages by index: messages_unconsumed holds only unconsumed ones, and without it every deleted run
-- would scan the whole messages table.
-- workflow_retention: the retention each workflow declares (`workflow(..., retention=)`), written by every
-- worker that registers it (seconds; NULL: the default applies). Whichever worker deletes reads it, so a
-- workflow's own retention holds even where a worker does not register that workflow.
-- Building the two indexes reads runs and messages while writes to them wait (0.3 s per million runs on a
-- 2-core machine).

CREATE INDEX runs_finished ON runs (finished_at) WHERE status IN ('completed', 'failed', 'canceled');
CREATE INDEX messages_by_run ON messages (run_id);

CREATE TABLE workflow_retention (
    workflow_name text PRIMARY KEY,
    seconds       double precision,          -- NULL: the deleting worker's default retention
    updated_at    timestamptz NOT NULL DEFAULT now()
);
