-- Walk one release row back to everything that made it: one row per hop.
--   release_row -> expansion (reasoner request) -> rollout (VLM request) -> question
--   (question-writer request) -> parent questions (stage 2) -> image -> source objects.
-- Parameters: release_id (e.g. 'lgt/20261125.1') and row_id (the row's `row_id`).
-- Works for sft_* rows (trace = expansion), questions/rl rows (question only) and dpo_* rows
-- (the pair's chosen and rejected traces). Portable SQL: PostgreSQL and SQLite.
WITH member AS (
    SELECT * FROM release_members WHERE release_id = :release_id AND row_id = :row_id
),
pair AS (
    SELECT p.* FROM pairs p JOIN member m ON m.pair_id = p.pair_id
),
traces AS (  -- the trace ids this row stands on: the SFT trace, or a pair's two traces
    SELECT trace_id AS trace_id, 'trace' AS role FROM member WHERE trace_id IS NOT NULL
    UNION ALL SELECT chosen_id, 'chosen' FROM pair
    UNION ALL SELECT rejected_id, 'rejected' FROM pair
),
expansion AS (
    SELECT e.*, t.role FROM expansions e JOIN traces t ON t.trace_id = e.expansion_id
),
rollout AS (  -- a rollout the row uses directly, or the one an expansion continues
    SELECT r.*, t.role FROM rollouts r JOIN traces t ON t.trace_id = r.rollout_id
    UNION ALL
    SELECT r.*, 'continued by ' || e.role FROM rollouts r JOIN expansion e ON e.rollout_id = r.rollout_id
),
question AS (
    SELECT q.* FROM questions q JOIN member m ON m.question_id = q.question_id
)
SELECT 1 AS step, 'release_row' AS hop, m.row_id AS ref_id, m.split AS detail,
       NULL AS model, NULL AS served_model, NULL AS request_key, NULL AS template,
       CAST(NULL AS INTEGER) AS prompt_tokens, CAST(NULL AS INTEGER) AS completion_tokens,
       NULL AS dag_id, NULL AS run_id, NULL AS task_id
FROM member m
UNION ALL
SELECT 2, 'pair', p.pair_id, p.rule, NULL, NULL, NULL, NULL, NULL, NULL, NULL, p.run_id, NULL
FROM pair p
UNION ALL
SELECT 3, 'expansion', e.expansion_id, e.role || ': cue ' || e.cue, r.model, r.served_model,
       r.request_key, r.template_id || ' v' || r.template_version, r.prompt_tokens,
       r.completion_tokens, r.dag_id, r.run_id, r.task_id
FROM expansion e JOIN model_requests r ON r.request_key = e.request_key
UNION ALL
SELECT 4, 'rollout', o.rollout_id, o.role || ': sample ' || o.sample_index, r.model,
       r.served_model, r.request_key, r.template_id || ' v' || r.template_version,
       r.prompt_tokens, r.completion_tokens, r.dag_id, r.run_id, r.task_id
FROM rollout o JOIN model_requests r ON r.request_key = o.request_key
UNION ALL
SELECT 5, 'question', q.question_id, 'stage ' || q.stage || ' ' || q.skill
       || COALESCE(' (' || q.operator || ')', ''), r.model, r.served_model, r.request_key,
       r.template_id || ' v' || r.template_version, r.prompt_tokens, r.completion_tokens,
       r.dag_id, r.run_id, r.task_id
FROM question q LEFT JOIN model_requests r ON r.request_key = q.request_key
UNION ALL
SELECT 6, 'parent_question', pq.question_id, 'stage ' || pq.stage || ' ' || pq.skill, r.model,
       r.served_model, r.request_key, r.template_id || ' v' || r.template_version,
       r.prompt_tokens, r.completion_tokens, r.dag_id, r.run_id, r.task_id
FROM question q
JOIN question_parents qp ON qp.question_id = q.question_id
JOIN questions pq ON pq.question_id = qp.parent_id
LEFT JOIN model_requests r ON r.request_key = pq.request_key
UNION ALL
SELECT 7, 'image', i.image_id, i.format || ' ' || i.width || 'x' || i.height, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, i.created_run_id, NULL
FROM question q JOIN images i ON i.image_id = q.image_id
UNION ALL
SELECT 8, 'source', s.bucket || '/' || s.key, 'etag ' || s.etag, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, s.first_run_id, NULL
FROM question q JOIN sources s ON s.image_id = q.image_id AND s.status = 'ok'
ORDER BY step, ref_id;
