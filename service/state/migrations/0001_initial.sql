-- Schema 1: the state several replicas share (service/state/database.py applies this once).

-- Small cache entries: fingerprints (fp/), pair results (pair/) and Hub records (hubref/), by cache key
-- (service/cache/keys.py). Deltas stay in each node's diskcache.
CREATE TABLE kinship_cache (
    key text PRIMARY KEY,
    kind text NOT NULL,
    value bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Merge jobs (service/jobs/pg_store.py): the record as JSON text plus the columns queries need.
CREATE TABLE merge_jobs (
    seq bigserial PRIMARY KEY,
    job_id text NOT NULL UNIQUE,
    request_id text NOT NULL,
    state text NOT NULL,
    owner text NOT NULL DEFAULT '',
    output_dir text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    cancel_requested boolean NOT NULL DEFAULT false,
    lease_until timestamptz,
    record text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- StartMerge is idempotent by request_id across the cluster.
CREATE UNIQUE INDEX merge_jobs_request_id ON merge_jobs (request_id) WHERE request_id <> '';
-- One active job per output directory, whichever replica accepted it.
CREATE UNIQUE INDEX merge_jobs_active_output ON merge_jobs (output_dir) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX merge_jobs_state_seq ON merge_jobs (state, seq);
