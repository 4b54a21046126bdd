-- The retention each workflow version declares, one row per (workflow name, version), as the workers serving
-- that version store it. 0010's workflow_retention held one row per workflow name, the last writer's: two
-- workers serving two versions of one workflow with different retentions overwrote each other's row, and the
-- worker that deleted had just written its own, so the shorter retention deleted the runs the other version
-- was to keep. Now every version's declaration stays until a worker declares that same version again, and the
-- deleting worker takes, per workflow name, the longest over all its versions (retention.py, deletion_plan).
-- Nothing deletes these rows: a version no worker serves any more keeps counting, so a retention is never
-- shortened by a worker that merely does not know that version.
--
-- workflow_retention stays, for the workers of older releases, which still write and read it during a rolling
-- deploy. Its row for a workflow counts until a worker of this release declares a version of that workflow
-- (list_retention): a workflow only older workers serve keeps its retention.

CREATE TABLE workflow_version_retention (
    workflow_name text NOT NULL,
    version       text NOT NULL,
    seconds       double precision,          -- NULL: declared none, the deleting worker's default applies to it
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_name, version)
);
