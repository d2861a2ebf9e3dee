-- The rest of the method: VLM rollouts, difficulty, expansions, trace verdicts with
-- cognitive behaviours, and preference pairs. Stage-2 questions live in `questions`
-- (stage = 2) with their parents in `question_parents`.

-- Simple chains of thought sampled from the VLM: k per question.
CREATE TABLE rollouts (
    rollout_id      TEXT PRIMARY KEY,
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    fingerprint     TEXT NOT NULL,
    sample_index    INTEGER NOT NULL,
    text            TEXT NOT NULL,              -- the whole reply, prefill included
    thinking        TEXT,                       -- between <think> and </think>
    final_letter    TEXT,
    correct         BOOLEAN NOT NULL,
    parse_error     TEXT,                       -- why it could not be read (then wrong)
    finish_reason   TEXT,
    request_key     TEXT REFERENCES model_requests (request_key),
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX rollouts_question ON rollouts (question_id, fingerprint);

-- Pass rate of the rollouts -> difficulty bucket, per question and rollout fingerprint.
CREATE TABLE difficulty (
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    fingerprint     TEXT NOT NULL,
    k               INTEGER NOT NULL,
    n_correct       INTEGER NOT NULL,
    n_parsed        INTEGER NOT NULL,
    pass_rate       DOUBLE PRECISION NOT NULL,
    bucket          TEXT NOT NULL,              -- easy | medium | hard | unsolved
    PRIMARY KEY (question_id, fingerprint)
);

-- Long traces: a reasoning LLM continues a rollout's thinking after a reflection cue.
CREATE TABLE expansions (
    expansion_id     TEXT PRIMARY KEY,
    rollout_id       TEXT NOT NULL REFERENCES rollouts (rollout_id),
    question_id      TEXT NOT NULL REFERENCES questions (question_id),
    fingerprint      TEXT NOT NULL,
    cue              TEXT NOT NULL,
    continuation     TEXT NOT NULL,             -- what the reasoner wrote
    reasoning_content TEXT,                     -- when the server returned it separately
    trace            TEXT NOT NULL,             -- <think>cot + cue + continuation</think> + answer
    final_letter     TEXT,
    correct          BOOLEAN NOT NULL,
    parse_error      TEXT,
    finish_reason    TEXT,
    request_key      TEXT REFERENCES model_requests (request_key),
    run_id           TEXT,
    created_at       TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX expansions_question ON expansions (question_id, fingerprint);
CREATE INDEX expansions_rollout ON expansions (rollout_id);

-- The filter's verdict on every trace (rollout or expansion), with behaviour counts.
CREATE TABLE trace_verdicts (
    trace_id        TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    trace_kind      TEXT NOT NULL,              -- rollout | expansion
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    correct         BOOLEAN NOT NULL,
    well_formed     BOOLEAN NOT NULL,           -- parses, sane length, no leak, not degenerate
    passed          BOOLEAN NOT NULL,           -- usable as an SFT target
    reason          TEXT,                       -- first rule it failed
    n_chars         INTEGER NOT NULL,
    verification    INTEGER NOT NULL DEFAULT 0,
    backtracking    INTEGER NOT NULL DEFAULT 0,
    subgoal         INTEGER NOT NULL DEFAULT 0,
    backward        INTEGER NOT NULL DEFAULT 0,
    tagger          TEXT NOT NULL,              -- heuristic | llm:<model>
    run_id          TEXT,
    PRIMARY KEY (trace_id, fingerprint)
);
CREATE INDEX trace_verdicts_question ON trace_verdicts (question_id, fingerprint);

-- DPO pairs: chosen and rejected traces of one question, the rule that made them.
CREATE TABLE pairs (
    pair_id         TEXT PRIMARY KEY,
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    fingerprint     TEXT NOT NULL,
    stage           INTEGER NOT NULL,
    rule            TEXT NOT NULL,              -- O>O->X | X->O>X->X | X->O>X | O>X
    chosen_id       TEXT NOT NULL,
    chosen_kind     TEXT NOT NULL,
    rejected_id     TEXT NOT NULL,
    rejected_kind   TEXT NOT NULL,
    length_margin   INTEGER NOT NULL,           -- len(chosen) - len(rejected), characters
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX pairs_question ON pairs (question_id, fingerprint);
