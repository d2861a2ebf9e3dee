-- Core lineage schema: runs, sources and images, annotations, the model request ledger,
-- stage-1 questions, rejections, stage progress markers and releases.
-- Portable SQL (PostgreSQL 15 and SQLite 3.35+). JSON is stored as TEXT.

CREATE TABLE pipeline_runs (
    run_id          TEXT PRIMARY KEY,
    run_type        TEXT NOT NULL,              -- scheduled | manual | cli | demo | test
    dag_id          TEXT,
    airflow_run_id  TEXT,
    params          TEXT NOT NULL DEFAULT '{}', -- JSON, secrets never included
    status          TEXT NOT NULL DEFAULT 'running',
    started_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at     TIMESTAMP
);

CREATE TABLE stage_runs (
    run_id            TEXT NOT NULL REFERENCES pipeline_runs (run_id),
    stage             TEXT NOT NULL,
    shard_index       INTEGER NOT NULL,
    num_shards        INTEGER NOT NULL,
    attempt           INTEGER NOT NULL,
    fingerprint       TEXT NOT NULL,
    dag_id            TEXT,
    task_id           TEXT,
    map_index         INTEGER,
    status            TEXT NOT NULL,            -- running | success | failed
    started_at        TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at       TIMESTAMP,
    wall_seconds      DOUBLE PRECISION,
    items_in          INTEGER NOT NULL DEFAULT 0, -- items considered
    items_skipped     INTEGER NOT NULL DEFAULT 0, -- already done under this fingerprint
    items_out         INTEGER NOT NULL DEFAULT 0, -- outputs committed by this attempt
    items_rejected    INTEGER NOT NULL DEFAULT 0, -- rejections committed by this attempt
    requests_sent     INTEGER NOT NULL DEFAULT 0, -- HTTP attempts that reached an endpoint
    cache_hits        INTEGER NOT NULL DEFAULT 0, -- answered from the ledger
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    errors            TEXT NOT NULL DEFAULT '{}', -- JSON: error class -> count
    error_detail      TEXT,
    PRIMARY KEY (run_id, stage, shard_index, attempt)
);

-- One row per object key seen under a source prefix. Same bytes under two keys = two
-- sources, one image.
CREATE TABLE sources (
    bucket          TEXT NOT NULL,
    key             TEXT NOT NULL,
    etag            TEXT NOT NULL,
    size            BIGINT NOT NULL,
    image_id        TEXT,
    status          TEXT NOT NULL,              -- ok | rejected | removed
    reason          TEXT,
    metadata        TEXT,                       -- JSON: the manifest row for this key
    metadata_sha256 TEXT,
    caption_annotation_id TEXT,                 -- current annotations from the metadata
    objects_annotation_id TEXT,
    first_run_id    TEXT,
    last_run_id     TEXT,
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (bucket, key)
);
CREATE INDEX sources_image ON sources (image_id);

CREATE TABLE images (
    image_id         TEXT PRIMARY KEY,           -- sha256 of the bytes
    hbucket          BIGINT NOT NULL,            -- shard bucket derived from image_id
    width            INTEGER NOT NULL,           -- after EXIF orientation
    height           INTEGER NOT NULL,
    format           TEXT NOT NULL,
    mode             TEXT NOT NULL,              -- original Pillow mode
    bytes            BIGINT NOT NULL,
    exif_orientation INTEGER,
    phash            TEXT,                       -- 64-bit perceptual hash, hex
    created_run_id   TEXT,
    created_at       TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX images_hbucket ON images (hbucket);

-- Captions and object boxes, from the manifest, a COCO file or a model.
CREATE TABLE annotations (
    annotation_id   TEXT PRIMARY KEY,
    image_id        TEXT NOT NULL REFERENCES images (image_id),
    kind            TEXT NOT NULL,              -- caption | objects
    source          TEXT NOT NULL,              -- manifest | coco | model
    source_ref      TEXT,                       -- manifest key / file, or model name
    request_key     TEXT,                       -- set when a model produced it
    content         TEXT NOT NULL,              -- JSON
    fingerprint     TEXT NOT NULL,
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX annotations_image ON annotations (image_id, kind);

-- The request ledger: one row per distinct request (content hash), whatever its outcome.
CREATE TABLE model_requests (
    request_key       TEXT PRIMARY KEY,
    role              TEXT NOT NULL,            -- vlm | llm | reasoner
    model             TEXT NOT NULL,            -- model asked for
    served_model      TEXT,                     -- model the server says answered
    template_id       TEXT NOT NULL,
    template_version  TEXT NOT NULL,
    status            TEXT NOT NULL,            -- ok | invalid_output | rejected | failed
    error_class       TEXT,
    http_status       INTEGER,
    attempts          INTEGER NOT NULL DEFAULT 0,
    overloads         INTEGER NOT NULL DEFAULT 0,
    transient_errors  INTEGER NOT NULL DEFAULT 0,
    regenerations     INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        DOUBLE PRECISION,
    finish_reason     TEXT,
    system_fingerprint TEXT,
    response          TEXT,                     -- JSON body, or NULL when stored as an object
    response_uri      TEXT,
    error_detail      TEXT,
    stage             TEXT,
    run_id            TEXT,
    dag_id            TEXT,
    task_id           TEXT,
    map_index         INTEGER,
    created_at        TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    completed_at      TIMESTAMP
);
CREATE INDEX model_requests_run ON model_requests (run_id, stage);

-- Questions of both stages (stage 2 ones have parents in question_parents).
CREATE TABLE questions (
    question_id     TEXT PRIMARY KEY,
    image_id        TEXT NOT NULL REFERENCES images (image_id),
    stage           INTEGER NOT NULL,           -- 1 = scale, 2 = complexity
    fingerprint     TEXT NOT NULL,
    item_id         TEXT NOT NULL,              -- the stage input that produced it
    skill           TEXT NOT NULL,
    question        TEXT NOT NULL,
    options         TEXT NOT NULL,              -- JSON list, in presented order
    answer_letter   TEXT NOT NULL,
    answer_text     TEXT NOT NULL,
    grounding       TEXT NOT NULL,              -- JSON list of object ids
    operator        TEXT,                       -- composition operator (stage 2)
    request_key     TEXT REFERENCES model_requests (request_key),
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX questions_image ON questions (image_id, stage, fingerprint);

CREATE TABLE question_parents (
    question_id     TEXT NOT NULL REFERENCES questions (question_id),
    parent_id       TEXT NOT NULL REFERENCES questions (question_id),
    position        INTEGER NOT NULL,
    PRIMARY KEY (question_id, parent_id)
);
CREATE INDEX question_parents_parent ON question_parents (parent_id);

-- Every rejected item, with a machine-readable reason. Never silently dropped.
CREATE TABLE rejections (
    rejection_id    TEXT PRIMARY KEY,
    run_id          TEXT,
    stage           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    item_kind       TEXT NOT NULL,              -- source | image | annotation | question | ...
    item_ref        TEXT NOT NULL,
    image_id        TEXT,
    reason          TEXT NOT NULL,
    detail          TEXT,
    request_key     TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX rejections_stage ON rejections (stage, reason);
CREATE INDEX rejections_image ON rejections (image_id);

-- "This stage finished this item under this fingerprint": the skip list for re-runs.
CREATE TABLE stage_items (
    stage           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    item_id         TEXT NOT NULL,
    status          TEXT NOT NULL,              -- done | rejected
    outputs         INTEGER NOT NULL DEFAULT 0,
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (stage, fingerprint, item_id)
);

CREATE TABLE releases (
    release_id        TEXT PRIMARY KEY,         -- name/version
    name              TEXT NOT NULL,
    version           TEXT NOT NULL,
    status            TEXT NOT NULL,            -- published
    uri               TEXT NOT NULL,
    manifest_sha256   TEXT NOT NULL,
    content_sha256    TEXT NOT NULL,            -- hash over the data files only
    parent_release_id TEXT,
    run_id            TEXT,
    simulated         BOOLEAN NOT NULL DEFAULT FALSE,
    counts            TEXT NOT NULL DEFAULT '{}',
    created_at        TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (name, version)
);

CREATE TABLE release_members (
    release_id      TEXT NOT NULL REFERENCES releases (release_id),
    split           TEXT NOT NULL,
    row_id          TEXT NOT NULL,
    question_id     TEXT,
    image_id        TEXT,
    trace_id        TEXT,
    pair_id         TEXT,
    PRIMARY KEY (release_id, split, row_id)
);
CREATE INDEX release_members_image ON release_members (image_id);
CREATE INDEX release_members_question ON release_members (question_id);

CREATE TABLE release_pointers (
    name            TEXT PRIMARY KEY,
    release_id      TEXT NOT NULL REFERENCES releases (release_id),
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
