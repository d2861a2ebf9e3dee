-- Release membership shared between versions. A release's rows are partitioned into buckets
-- (lgt_ops/release/incremental.py); a bucket's member rows are written once, by the release
-- that built it (`member_rows`, keyed by that owner and the bucket), and every version lists
-- which (owner, bucket) sets it holds (`release_member_sets`, one row per bucket). A version
-- that reuses an unchanged bucket links its parent's set (one row) instead of copying the
-- set's rows. `release_members` stays the same relation, now a view over the two tables, so
-- queries and the views of 0004 read it as before. Rows recorded before this migration keep
-- one set per release (bucket -1), which no later version reuses.
-- Portable SQL (PostgreSQL 15 and SQLite 3.35+); one statement per ';' at a line end.

CREATE TABLE member_rows (
    owner_release_id TEXT NOT NULL REFERENCES releases (release_id),
    bucket           INTEGER NOT NULL,
    split            TEXT NOT NULL,
    row_id           TEXT NOT NULL,
    question_id      TEXT,
    image_id         TEXT,
    trace_id         TEXT,
    pair_id          TEXT,
    PRIMARY KEY (owner_release_id, bucket, split, row_id)
);
CREATE INDEX member_rows_image ON member_rows (image_id);
CREATE INDEX member_rows_question ON member_rows (question_id);
CREATE INDEX member_rows_row ON member_rows (row_id);

CREATE TABLE release_member_sets (
    release_id       TEXT NOT NULL REFERENCES releases (release_id),
    bucket           INTEGER NOT NULL,
    owner_release_id TEXT NOT NULL REFERENCES releases (release_id),
    PRIMARY KEY (release_id, bucket)
);
CREATE INDEX release_member_sets_owner ON release_member_sets (owner_release_id, bucket);

INSERT INTO member_rows
SELECT release_id, -1, split, row_id, question_id, image_id, trace_id, pair_id
FROM release_members;

INSERT INTO release_member_sets
SELECT DISTINCT release_id, -1, release_id FROM release_members;

-- The views reading release_members are dropped and re-created unchanged around the swap
-- (PostgreSQL binds a view to the table itself, not its name).
DROP VIEW v_release_model_usage;
DROP VIEW v_image_outputs;
DROP VIEW v_release_row_lineage;
DROP TABLE release_members;

CREATE VIEW release_members AS
SELECT s.release_id, m.split, m.row_id, m.question_id, m.image_id, m.trace_id, m.pair_id
FROM release_member_sets s
JOIN member_rows m ON m.owner_release_id = s.owner_release_id AND m.bucket = s.bucket;

CREATE VIEW v_release_row_lineage AS
SELECT m.release_id, m.split, m.row_id,
       q.question_id, q.stage AS question_stage, i.image_id,
       s.bucket AS source_bucket, s.key AS source_key, s.etag AS source_etag,
       (SELECT COUNT(*) FROM sources o
        WHERE o.image_id = i.image_id AND o.status = 'ok') AS ok_sources,
       q.request_key AS question_request_key, qr.model, qr.served_model,
       qr.template_id, qr.template_version, qr.prompt_tokens, qr.completion_tokens,
       qr.dag_id, qr.run_id, qr.task_id,
       m.trace_id, m.pair_id,
       e.request_key AS expansion_request_key, er.model AS expansion_model,
       er.served_model AS expansion_served_model,
       er.prompt_tokens AS expansion_prompt_tokens,
       er.completion_tokens AS expansion_completion_tokens,
       e.rollout_id, ro.request_key AS rollout_request_key
FROM release_members m
LEFT JOIN questions q ON q.question_id = m.question_id
LEFT JOIN images i ON i.image_id = q.image_id
LEFT JOIN sources s ON s.image_id = i.image_id AND s.status = 'ok'
    AND NOT EXISTS (SELECT 1 FROM sources f
                    WHERE f.image_id = s.image_id AND f.status = 'ok'
                      AND (f.bucket < s.bucket OR (f.bucket = s.bucket AND f.key < s.key)))
LEFT JOIN model_requests qr ON qr.request_key = q.request_key
LEFT JOIN expansions e ON e.expansion_id = m.trace_id
LEFT JOIN model_requests er ON er.request_key = e.request_key
LEFT JOIN rollouts ro ON ro.rollout_id = e.rollout_id;

CREATE VIEW v_image_outputs AS
SELECT i.image_id,
       (SELECT COUNT(*) FROM sources s
        WHERE s.image_id = i.image_id AND s.status = 'ok') AS sources,
       (SELECT COUNT(*) FROM questions q
        WHERE q.image_id = i.image_id AND q.stage = 1) AS questions_stage1,
       (SELECT COUNT(*) FROM questions q
        WHERE q.image_id = i.image_id AND q.stage = 2) AS questions_stage2,
       (SELECT COUNT(*) FROM rollouts r JOIN questions q ON q.question_id = r.question_id
        WHERE q.image_id = i.image_id) AS rollouts,
       (SELECT COUNT(*) FROM expansions e JOIN questions q ON q.question_id = e.question_id
        WHERE q.image_id = i.image_id) AS expansions,
       (SELECT COUNT(DISTINCT CASE WHEN v.passed THEN v.trace_id END)
        FROM trace_verdicts v JOIN questions q ON q.question_id = v.question_id
        WHERE q.image_id = i.image_id) AS traces_passed,
       (SELECT COUNT(*) FROM pairs p JOIN questions q ON q.question_id = p.question_id
        WHERE q.image_id = i.image_id) AS pairs,
       (SELECT COUNT(DISTINCT m.release_id) FROM release_members m
        WHERE m.image_id = i.image_id) AS releases,
       (SELECT COUNT(*) FROM release_members m
        WHERE m.image_id = i.image_id) AS release_rows
FROM images i;

CREATE VIEW v_release_model_usage AS
WITH traces AS (
    SELECT release_id, trace_id FROM release_members WHERE trace_id IS NOT NULL
    UNION
    SELECT m.release_id, p.chosen_id FROM release_members m JOIN pairs p ON p.pair_id = m.pair_id
    UNION
    SELECT m.release_id, p.rejected_id FROM release_members m JOIN pairs p ON p.pair_id = m.pair_id
),
request_keys AS (
    SELECT m.release_id, q.request_key
    FROM release_members m JOIN questions q ON q.question_id = m.question_id
    UNION
    SELECT t.release_id, COALESCE(e.request_key, r.request_key)
    FROM traces t
    LEFT JOIN expansions e ON e.expansion_id = t.trace_id
    LEFT JOIN rollouts r ON r.rollout_id = t.trace_id
)
SELECT k.release_id, mr.role, mr.model, mr.served_model,
       COUNT(*) AS requests,
       SUM(mr.prompt_tokens) AS prompt_tokens,
       SUM(mr.completion_tokens) AS completion_tokens
FROM request_keys k
JOIN model_requests mr ON mr.request_key = k.request_key
GROUP BY k.release_id, mr.role, mr.model, mr.served_model;
