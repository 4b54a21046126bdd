-- A fork remembers its source run and the step it was forked from (see the PostgreSQL migration).

ALTER TABLE runs ADD COLUMN forked_from TEXT;
ALTER TABLE runs ADD COLUMN forked_step TEXT;
