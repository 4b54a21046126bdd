-- Retention reads one workflow's finished runs at a time, and the runs list filtered by workflow and status
-- reads only the runs it shows.
--
-- runs_finished_by_workflow: every retention batch is for one workflow (retention.py expands the default pass
-- into the workflows that have finished runs, a loose scan of this index): it reads that workflow's expired
-- runs oldest first and stops at its limit. runs_finished, by finish time alone, made a workflow's batch walk
-- past the finished runs of every other workflow older than its cutoff, again at every batch (with 450,000
-- runs of other workflows kept: 135 ms a batch even with nothing to delete, and a first pass deleting 49,000
-- runs took 78 s). No query of this release reads runs_finished, and none of an older release names it, so it
-- goes: a run's finish writes one index entry for retention, as before.
--
-- runs_by_workflow_status: `list_runs(workflow=, status=)` (the dashboard's filter, refreshed every second)
-- walked the whole table by id when fewer runs matched than the page holds (125 ms with 500,000 runs). It
-- costs each insert and each status change one more index entry; the filter on workflow and version, and
-- the one on queue, read runs_by_workflow and the primary key as before: they cost the workflow's runs or the
-- table, and are not worth an index entry on every insert and status change (the commit says more).
--
-- Built inside the migration's transaction, as 0020 explains (CREATE INDEX CONCURRENTLY cannot run there):
-- writes to runs wait for the build, which reads the table once (about 0.3 s per 200,000 runs on a loaded
-- 2-core machine); reads do not wait, but for DROP INDEX, which locks the table until the commit.

CREATE INDEX runs_finished_by_workflow ON runs (workflow_name, finished_at)
    WHERE status IN ('completed', 'failed', 'canceled');
DROP INDEX runs_finished;
CREATE INDEX runs_by_workflow_status ON runs (workflow_name, status, id DESC);
