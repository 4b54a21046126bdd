-- Broadcast events no run can read any more are deleted (retention.py, "Broadcast events"): those emitted before
-- the creation of the oldest run that is not completed, less a margin. Each batch takes the oldest of them off
-- this index and stops at its limit; events_by_name, by (name, key, emitted_at), could only be read whole. An
-- emit writes one more index entry (events are only ever inserted and deleted, never updated).
--
-- Built inside the migration's transaction, as 0020 explains (CREATE INDEX CONCURRENTLY cannot run there): emits
-- wait for the build, which reads the events table once; reads do not wait.
CREATE INDEX events_by_emission ON events (emitted_at);
