-- The three indexes the runs lists read newest first (runs_by_workflow, runs_by_status, runs_by_workflow_status)
-- are rebuilt ascending by id. PostgreSQL reads them backward for ORDER BY id DESC as fast as forward, but it
-- writes them much better this way: ids are time-ordered, so a new run's entry (and the entry of a status a run
-- moves into, mostly a recent run) lands after its group's newest. Ascending, that is the end of the group, where
-- a full page is split leaving its left half full and the insert into the index's last page skips the descent;
-- descending, it is the start of the group, where every split leaves two half-empty pages. Measured on 10,000
-- runs inserted in one COPY: these indexes 52 pages each instead of 91 (110 -> 63 for the three-column one), and
-- the server's CPU per run inserted 15 -> 12 us (benchmarks/README.md, the tenth session).
--
-- Each is built under a new name, then the old is dropped and the new renamed, so reads wait only from the drop
-- to the commit; writes to runs wait for the builds, which read the table once each (about 0.3 s per 200,000
-- runs on a loaded 2-core machine), as 0026 explains. No query names these indexes.

CREATE INDEX runs_by_workflow_ascending ON runs (workflow_name, id);
CREATE INDEX runs_by_status_ascending ON runs (status, id);
CREATE INDEX runs_by_workflow_status_ascending ON runs (workflow_name, status, id);
DROP INDEX runs_by_workflow;
DROP INDEX runs_by_status;
DROP INDEX runs_by_workflow_status;
ALTER INDEX runs_by_workflow_ascending RENAME TO runs_by_workflow;
ALTER INDEX runs_by_status_ascending RENAME TO runs_by_status;
ALTER INDEX runs_by_workflow_status_ascending RENAME TO runs_by_workflow_status;
