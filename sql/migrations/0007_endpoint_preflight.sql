-- What the endpoint preflight found, per pipeline run and role (lgt_ops/llm/preflight.py):
-- the endpoint (base URL without credentials), the model, what the server reports (version,
-- context length), what the selected stages need (their largest request in tokens), the
-- capabilities the probe request found (JSON: image transport, json_schema, where the
-- reasoner's thinking comes back), the probe's latency, and ok | failed | unreachable with
-- the one-line problem. A repeated preflight of the same run replaces its rows.
CREATE TABLE endpoint_preflight (
    run_id          TEXT NOT NULL REFERENCES pipeline_runs (run_id),
    role            TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    stages          TEXT NOT NULL,              -- comma-separated stages using this role
    server_version  TEXT,
    max_model_len   INTEGER,
    needed_tokens   INTEGER,
    capabilities    TEXT NOT NULL DEFAULT '{}', -- JSON
    latency_ms      DOUBLE PRECISION,
    status          TEXT NOT NULL,
    problem         TEXT,
    checked_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (run_id, role)
);
