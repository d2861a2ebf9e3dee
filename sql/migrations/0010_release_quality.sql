-- Release quality: the figures lgt_ops/release/quality.py measures on every release at publish
-- time (the manifest's `quality` and the card's "Quality" section hold the same), one row per
-- (release, metric, scope). Portable SQL (PostgreSQL 15 and SQLite 3.35+).
-- (One statement per ';' at a line end, as lgt_ops/db/migrate.py splits them.)
--   metric       mcq_invalid, letter_deviation, value_rank_deviation, stage2_inconsistent,
--                chain_ill_posed, lineage_unresolved, sft_wrong_answer, dpo_misordered,
--                leaked_traces (README "Release quality" defines each)
--   scope        all | stage1 | stage2 | skill:<skill> | op:<operator> | sft | dpo | a split
--   value        a count of offending rows (must be 0), or a largest deviation from uniform
--   max_allowed  the largest value that passes
--   n            the rows the figure was measured on
--   detail       the first offending item and why, when the figure fails
CREATE TABLE release_quality (
    release_id   TEXT NOT NULL REFERENCES releases (release_id),
    metric       TEXT NOT NULL,
    scope        TEXT NOT NULL,
    value        DOUBLE PRECISION NOT NULL,
    max_allowed  DOUBLE PRECISION NOT NULL,
    n            BIGINT NOT NULL,
    passed       BOOLEAN NOT NULL,
    detail       TEXT,
    PRIMARY KEY (release_id, metric, scope)
);
