-- The retention each workflow version declares, one row per (workflow name, version) (see the PostgreSQL
-- migration of the same name): 0007's workflow_retention kept only the last writer's per workflow name.
-- workflow_retention stays for the workers of older releases; its row counts until a worker of this release
-- declares a version of that workflow.

CREATE TABLE workflow_version_retention (
    workflow_name TEXT NOT NULL,
    version       TEXT NOT NULL,
    seconds       REAL,                      -- NULL: declared none, the deleting worker's default applies to it
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (workflow_name, version)
);
