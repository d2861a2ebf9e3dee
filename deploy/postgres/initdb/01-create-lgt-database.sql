-- Run once by the postgres image on first start (empty data directory), through
-- /docker-entrypoint-initdb.d, connected to POSTGRES_DB (= "airflow", the Airflow metadata DB)
-- as POSTGRES_USER. Creates the second database on the same server: "lgt", the lineage DB
-- that `lgt db upgrade` migrates. No credentials here: the owner is POSTGRES_USER.
--
-- Changing this file does not affect an existing volume: `docker compose down -v` to re-init.
SELECT 'CREATE DATABASE lgt'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'lgt')\gexec
