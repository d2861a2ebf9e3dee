-- A role's endpoint may name several replicas, and the preflight checks each of them: one
-- endpoint_preflight row per pipeline run, role and replica (the endpoint column). SQLite
-- cannot change a primary key in place: the table is rebuilt with the same columns.
CREATE TABLE endpoint_preflight_by_replica (
    run_id          TEXT NOT NULL REFERENCES pipeline_runs (run_id),
    role            TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    stages          TEXT NOT NULL,
    server_version  TEXT,
    max_model_len   INTEGER,
    needed_tokens   INTEGER,
    capabilities    TEXT NOT NULL DEFAULT '{}',
    latency_ms      DOUBLE PRECISION,
    status          TEXT NOT NULL,
    problem         TEXT,
    checked_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (run_id, role, endpoint)
);
INSERT INTO endpoint_preflight_by_replica
    SELECT run_id, role, endpoint, model, stages, server_version, max_model_len, needed_tokens,
           capabilities, latency_ms, status, problem, checked_at
    FROM endpoint_preflight;
DROP TABLE endpoint_preflight;
ALTER TABLE endpoint_preflight_by_replica RENAME TO endpoint_preflight;
