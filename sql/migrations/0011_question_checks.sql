-- Per-question checks that decide whether a question stays current (lgt_ops/current.py):
--   blind   a text-only LLM answers it from its text and options alone, n samples; kept when
--           the share answered right (score) is below blind_reject_at (bound);
--   harden  a composed question's VLM pass rate (score) against its parents' reference rate
--           minus the margin (bound); kept when score < bound (harder than its parents).
-- A rejected question also has a rejection row with its reason. Portable SQL (PostgreSQL 15
-- and SQLite 3.35+).

CREATE TABLE question_checks (
    question_id  TEXT NOT NULL REFERENCES questions (question_id),
    fingerprint  TEXT NOT NULL,              -- the checking stage's fingerprint
    stage        TEXT NOT NULL,              -- blind | harden
    n            INTEGER NOT NULL,           -- samples (blind) or rollouts (harden)
    n_correct    INTEGER NOT NULL,
    score        DOUBLE PRECISION NOT NULL,  -- n_correct / n
    bound        DOUBLE PRECISION NOT NULL,  -- kept when score < bound
    kept         BOOLEAN NOT NULL,
    request_key  TEXT REFERENCES model_requests (request_key),
    run_id       TEXT,
    created_at   TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (question_id, fingerprint)
);

CREATE INDEX question_checks_stage ON question_checks (stage, fingerprint, kept);
