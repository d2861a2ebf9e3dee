-- Shard attempts by stage and fingerprint: a rule stage asks whether an earlier run finished a
-- shard of it under its fingerprint (`current.worked_before`: a refresh, where most of a shard
-- is done and reading trace ids before trace texts pays). Without this index the question
-- reads every run's attempts. Portable SQL (PostgreSQL 15 and SQLite 3.35+).

CREATE INDEX stage_runs_stage ON stage_runs (stage, fingerprint, status);
