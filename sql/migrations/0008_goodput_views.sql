-- Goodput: what the model requests bought, per run and per release (lgt_ops/goodput.py reads
-- these; README "Goodput" defines every figure). Portable SQL (PostgreSQL 15 and SQLite
-- 3.35+); ratios are NULL where the denominator is 0 (a run that asked nothing).
-- (One statement per ';' at a line end, as lgt_ops/db/migrate.py splits them.)

-- A release's figures are measured at publish time (lgt_ops/release/goodput.py) and kept
-- with it, like its manifest: per stage, the requests under the release's stage
-- fingerprints for its image set (the requests behind its outputs and behind its
-- rejections: rejected work costs too, whichever run paid for it), their reported tokens,
-- the stage's accepted outputs for that image set and its rejections. Stage 'release' is the
-- whole: every stage's requests and tokens, accepted = the release's rows (all splits).
CREATE TABLE release_goodput (
    release_id        TEXT NOT NULL REFERENCES releases (release_id),
    stage             TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    accepted          BIGINT NOT NULL,
    rejected          BIGINT NOT NULL,
    PRIMARY KEY (release_id, stage)
);

-- A release's rejections per stage and reason (the manifest's counts.rejections).
CREATE TABLE release_removals (
    release_id      TEXT NOT NULL REFERENCES releases (release_id),
    stage           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    removed         BIGINT NOT NULL,
    PRIMARY KEY (release_id, stage, reason)
);

-- Goodput of each run, per stage. Over ALL attempts of every shard (a failed attempt's
-- calls were paid; each output is committed by exactly one attempt), unlike
-- v_stage_funnel, which shows the last attempt:
--   requests          ledger rows (distinct requests) this run's stage made: answered,
--                     invalid or failed, each counted once however often it was retried.
--   http_attempts     HTTP calls that reached an endpoint (retries, regenerations included).
--   ledger_hits       requests answered from the ledger, not paid again.
--   prompt_tokens,    the usage the endpoint reported for those ledger rows (tokens in/out).
--   completion_tokens
--   accepted          outputs the stage committed (stage_runs.items_out).
--   rejected          rejections it committed (stage_runs.items_rejected).
--   accepted_per_1k_requests = 1000 * accepted / requests.
--   accepted_per_m_tokens    = 1e6 * accepted / (prompt_tokens + completion_tokens).
CREATE VIEW v_run_goodput AS
WITH keyset AS (
    SELECT run_id, stage FROM stage_runs
    UNION
    SELECT run_id, stage FROM model_requests WHERE run_id IS NOT NULL AND stage IS NOT NULL
),
attempts AS (
    SELECT run_id, stage,
           SUM(items_out) AS accepted, SUM(items_rejected) AS rejected,
           SUM(requests_sent) AS http_attempts, SUM(cache_hits) AS ledger_hits
    FROM stage_runs
    GROUP BY run_id, stage
),
ledger AS (
    SELECT run_id, stage, COUNT(*) AS requests,
           SUM(COALESCE(prompt_tokens, 0)) AS prompt_tokens,
           SUM(COALESCE(completion_tokens, 0)) AS completion_tokens
    FROM model_requests
    WHERE run_id IS NOT NULL AND stage IS NOT NULL
    GROUP BY run_id, stage
),
figures AS (
    SELECT k.run_id, k.stage,
           CAST(COALESCE(l.requests, 0) AS BIGINT) AS requests,
           CAST(COALESCE(a.http_attempts, 0) AS BIGINT) AS http_attempts,
           CAST(COALESCE(a.ledger_hits, 0) AS BIGINT) AS ledger_hits,
           CAST(COALESCE(l.prompt_tokens, 0) AS BIGINT) AS prompt_tokens,
           CAST(COALESCE(l.completion_tokens, 0) AS BIGINT) AS completion_tokens,
           CAST(COALESCE(a.accepted, 0) AS BIGINT) AS accepted,
           CAST(COALESCE(a.rejected, 0) AS BIGINT) AS rejected
    FROM keyset k
    LEFT JOIN attempts a ON a.run_id = k.run_id AND a.stage = k.stage
    LEFT JOIN ledger l ON l.run_id = k.run_id AND l.stage = k.stage
)
SELECT run_id, stage, requests, http_attempts, ledger_hits, prompt_tokens, completion_tokens,
       accepted, rejected,
       CASE WHEN requests > 0
            THEN CAST(1000.0 * accepted / requests AS DOUBLE PRECISION) END
           AS accepted_per_1k_requests,
       CASE WHEN prompt_tokens + completion_tokens > 0
            THEN CAST(1000000.0 * accepted / (prompt_tokens + completion_tokens)
                      AS DOUBLE PRECISION) END
           AS accepted_per_m_tokens
FROM figures;

-- What share of each stage's output each filter removed, per run: rejections by reason over
-- the stage's decided output (accepted + rejected, all attempts of the run). A rejection
-- counts for the run that first recorded it.
CREATE VIEW v_run_removals AS
WITH decided AS (
    SELECT run_id, stage, SUM(items_out) + SUM(items_rejected) AS decided
    FROM stage_runs
    GROUP BY run_id, stage
),
removed AS (
    SELECT run_id, stage, reason, COUNT(*) AS removed
    FROM rejections
    WHERE run_id IS NOT NULL
    GROUP BY run_id, stage, reason
)
SELECT r.run_id, r.stage, r.reason, CAST(r.removed AS BIGINT) AS removed,
       CAST(COALESCE(d.decided, 0) AS BIGINT) AS decided,
       CASE WHEN d.decided > 0
            THEN CAST(1.0 * r.removed / d.decided AS DOUBLE PRECISION) END AS share
FROM removed r
LEFT JOIN decided d ON d.run_id = r.run_id AND d.stage = r.stage;

-- Goodput of each release, per stage (and 'release' for the whole), with the same ratios.
CREATE VIEW v_release_goodput AS
SELECT g.release_id, r.name, r.version, r.simulated, g.stage, g.requests,
       g.prompt_tokens, g.completion_tokens, g.accepted, g.rejected,
       CASE WHEN g.requests > 0
            THEN CAST(1000.0 * g.accepted / g.requests AS DOUBLE PRECISION) END
           AS accepted_per_1k_requests,
       CASE WHEN g.prompt_tokens + g.completion_tokens > 0
            THEN CAST(1000000.0 * g.accepted / (g.prompt_tokens + g.completion_tokens)
                      AS DOUBLE PRECISION) END
           AS accepted_per_m_tokens
FROM release_goodput g
JOIN releases r ON r.release_id = g.release_id;

-- What share of each stage's output each filter removed, per release: removed over the
-- stage's decided output for the release's image set (accepted + rejected).
CREATE VIEW v_release_removals AS
SELECT x.release_id, x.stage, x.reason, x.removed, g.accepted + g.rejected AS decided,
       CASE WHEN g.accepted + g.rejected > 0
            THEN CAST(1.0 * x.removed / (g.accepted + g.rejected) AS DOUBLE PRECISION) END
           AS share
FROM release_removals x
LEFT JOIN release_goodput g ON g.release_id = x.release_id AND g.stage = x.stage;
