-- stage_items' key leads with the item: a stage asks which of a shard's ~500 item ids it has
-- done (`already_done`: stage, fingerprint and item_id = ANY(ids)). Keyed (stage, fingerprint,
-- item_id), that lookup depended on the statistics: while a stage writes its first rows, they
-- say the stage has none, and the planner read all of the stage's rows for every shard (the
-- ids a filter, not an index condition), so a first run's shard lookups grew with the rows
-- written so far (30 ms a shard at 100k images). Led by the item id, the only plan is one
-- index probe per id, whatever the statistics say.
ALTER TABLE stage_items
    DROP CONSTRAINT stage_items_pkey,
    ADD CONSTRAINT stage_items_pkey PRIMARY KEY (item_id, stage, fingerprint);
