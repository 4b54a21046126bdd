-- Broadcast events no run can read any more are deleted oldest first, off this index (see the PostgreSQL
-- migration of the same name).
CREATE INDEX events_by_emission ON events (emitted_at);
