-- Provenance views: ready-made answers to the common lineage questions, over the tables of
-- 0001-0003. Portable SQL (PostgreSQL 15 and SQLite 3.35+): no string aggregation, no JSON
-- functions, booleans read through CASE. Query them with a WHERE on their first column(s).
-- (One statement per ';' at a line end, as lgt_ops/db/migrate.py splits them.)

-- Where does each release row come from? One row per (release_id, split, row_id): its
-- question and that question's request, the image, the image's first live source (by
-- bucket, key, as the pipeline reads it; ok_sources says how many there are) and, for rows
-- whose trace is an expansion (sft_*), the reasoner request and the rollout it continued.
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

-- What did each stage of a run do? Per run_id and stage, summed over shards, counting only
-- the last attempt of each shard (a retried shard counts once, as its retry reports it:
-- work an earlier attempt finished shows as skipped).
CREATE VIEW v_stage_funnel AS
SELECT s.run_id, s.stage,
       SUM(s.items_in) AS items_in, SUM(s.items_skipped) AS items_skipped,
       SUM(s.items_out) AS items_out, SUM(s.items_rejected) AS items_rejected,
       SUM(s.requests_sent) AS requests_sent, SUM(s.cache_hits) AS cache_hits,
       CAST(SUM(s.prompt_tokens) AS BIGINT) AS prompt_tokens,
       CAST(SUM(s.completion_tokens) AS BIGINT) AS completion_tokens,
       SUM(s.wall_seconds) AS wall_seconds,
       COUNT(*) AS shards,
       SUM(CASE WHEN s.status = 'failed' THEN 1 ELSE 0 END) AS failed_shards
FROM stage_runs s
JOIN (SELECT run_id, stage, shard_index, MAX(attempt) AS attempt
      FROM stage_runs GROUP BY run_id, stage, shard_index) l
  ON l.run_id = s.run_id AND l.stage = s.stage AND l.shard_index = s.shard_index
 AND l.attempt = s.attempt
GROUP BY s.run_id, s.stage;

-- Why were items rejected? Per run_id, stage and reason: how many rejections.
CREATE VIEW v_stage_rejections AS
SELECT run_id, stage, reason, COUNT(*) AS rejected
FROM rejections
GROUP BY run_id, stage, reason;

-- What became of each image? Per image_id: its live sources and everything made from it
-- (all fingerprints), the traces that passed the filter, and the releases that carry it.
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

-- Which models, and how many tokens, stand behind a release? Per release_id, role, model
-- and served_model: the distinct requests behind its rows (each row's question, its trace,
-- and a DPO pair's chosen and rejected traces; a trace is an expansion or a rollout), each
-- request counted once however many rows share it. Not counted: parent questions of stage-2
-- questions, model annotations, and the rollout an expansion continued (unless a row uses
-- that rollout itself).
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
