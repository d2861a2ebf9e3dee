-- Which process runs a pipeline run / stage attempt, so a later attempt can tell a row left
-- `running` by a killed process and close it as `abandoned` (lgt_ops/liveness.py), and the
-- error a failed pipeline run ended with. Status values now: running | success | failed |
-- abandoned.
ALTER TABLE stage_runs ADD COLUMN host TEXT;
ALTER TABLE stage_runs ADD COLUMN pid INTEGER;
ALTER TABLE stage_runs ADD COLUMN pid_started BIGINT;
ALTER TABLE pipeline_runs ADD COLUMN host TEXT;
ALTER TABLE pipeline_runs ADD COLUMN pid INTEGER;
ALTER TABLE pipeline_runs ADD COLUMN pid_started BIGINT;
ALTER TABLE pipeline_runs ADD COLUMN error_detail TEXT;
CREATE INDEX stage_runs_running ON stage_runs (status) WHERE status = 'running';
