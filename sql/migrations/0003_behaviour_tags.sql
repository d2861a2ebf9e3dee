-- Cognitive-behaviour counts from an LLM classifier (optional; the filter's heuristic
-- counts live in trace_verdicts). One row per trace and tagger fingerprint.
CREATE TABLE behaviour_tags (
    trace_id        TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    verification    INTEGER NOT NULL,
    backtracking    INTEGER NOT NULL,
    subgoal         INTEGER NOT NULL,
    backward        INTEGER NOT NULL,
    tagger          TEXT NOT NULL,              -- llm:<model>
    request_key     TEXT REFERENCES model_requests (request_key),
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (trace_id, fingerprint)
);
