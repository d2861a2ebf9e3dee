-- Indexes for the stages' bulk lookups by item: a stage reads the current stage-1 and
-- stage-2 questions of a shard by the item they were made from (`current.stage1` and
-- `current.questions`: fingerprint and item_id IN a chunk of ids). Without this index each
-- chunk scanned the whole questions table, so a run's planning grew with the square of the
-- corpus. Portable SQL (PostgreSQL 15 and SQLite 3.35+).

CREATE INDEX questions_item ON questions (item_id, fingerprint);
