-- Resource samples of running backends, one row per backend per sampling tick,
-- with the fields of Plane's BackendMetricsMessage. Old rows are deleted by
-- the sampler (metrics.retention), so the table stays bounded.
CREATE TABLE metrics_samples (
    sample_id INTEGER PRIMARY KEY,
    backend_id TEXT NOT NULL REFERENCES backends (id),
    timestamp_ms INTEGER NOT NULL,
    -- Memory, in bytes: resident plus page cache; Docker's usage less the
    -- inactive file cache; active, inactive and unevictable pages; the limit.
    mem_total INTEGER NOT NULL,
    mem_used INTEGER NOT NULL,
    mem_active INTEGER NOT NULL,
    mem_inactive INTEGER NOT NULL,
    mem_unevictable INTEGER NOT NULL,
    mem_limit INTEGER NOT NULL,
    -- CPU time, in nanoseconds, used by the container (cpu_used) and by the
    -- whole host (sys_cpu) since the backend's previous sample, as Plane
    -- reports them: cpu_used / sys_cpu * online CPUs is the container's share.
    -- NULL on a backend's first sample, which has nothing to compare with.
    cpu_used INTEGER,
    sys_cpu INTEGER,
    -- The raw cumulative counters the deltas come from: the container's CPU
    -- time since it started, the host's since boot.
    cpu_total_ns INTEGER NOT NULL,
    sys_cpu_total_ns INTEGER NOT NULL
);

CREATE INDEX metrics_samples_by_backend ON metrics_samples (backend_id, timestamp_ms);
CREATE INDEX metrics_samples_by_time ON metrics_samples (timestamp_ms);
