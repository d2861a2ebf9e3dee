-- A role's endpoint may name several replicas, and the preflight checks each of them: one
-- endpoint_preflight row per pipeline run, role and replica (the endpoint column).
ALTER TABLE endpoint_preflight DROP CONSTRAINT endpoint_preflight_pkey;
ALTER TABLE endpoint_preflight ADD PRIMARY KEY (run_id, role, endpoint);
