-- A worker records the queues it claims from (see the PostgreSQL migration 0016); NULL: unknown.

ALTER TABLE workers ADD COLUMN queues TEXT;
