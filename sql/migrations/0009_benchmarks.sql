-- Evaluation benchmark files the pipeline decontaminates against (lgt_ops/decontam.py).
-- One row per benchmark object version (key + etag) under the benchmark prefix: an image with
-- the 64-bit pHashes of it and of its crops (hashed once, reused by every task), a
-- questions.jsonl with its question count, or an unreadable file with the reason.
-- Portable SQL (PostgreSQL 15 and SQLite 3.35+).

CREATE TABLE benchmark_entries (
    store_url   TEXT NOT NULL,
    key         TEXT NOT NULL,
    etag        TEXT NOT NULL,
    benchmark   TEXT NOT NULL,              -- the folder under the prefix
    kind        TEXT NOT NULL,              -- image | questions | unreadable
    items       INTEGER NOT NULL DEFAULT 0, -- hashes (image) or questions (questions file)
    phashes     TEXT,                       -- image: space-separated 16-hex-digit pHashes
    detail      TEXT,                       -- unreadable: why
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (store_url, key, etag)
);

CREATE INDEX benchmark_entries_benchmark ON benchmark_entries (benchmark, kind);
