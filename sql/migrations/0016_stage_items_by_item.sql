-- stage_items' key leads with the item: a stage asks which of a shard's ~500 item ids it has
-- done (`already_done`: stage, fingerprint and item_id IN ids), one index probe per id
-- whatever the statistics say (see the PostgreSQL twin of this file for why). SQLite cannot
-- change a primary key in place: the table is rebuilt with the same columns.
CREATE TABLE stage_items_by_item (
    stage           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    item_id         TEXT NOT NULL,
    status          TEXT NOT NULL,              -- done | rejected
    outputs         INTEGER NOT NULL DEFAULT 0,
    run_id          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (item_id, stage, fingerprint)
);
INSERT INTO stage_items_by_item
    SELECT stage, fingerprint, item_id, status, outputs, run_id, created_at FROM stage_items;
DROP TABLE stage_items;
ALTER TABLE stage_items_by_item RENAME TO stage_items;
