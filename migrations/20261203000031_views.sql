-- Views for questions about the past, asked with plain SQL (`drover sql`,
-- docs/sql.md). Times are milliseconds since the Unix epoch; durations are
-- seconds (REAL).

-- One row per backend: when it was scheduled, became ready and ended, and how.
--   scheduled_at      the spawn request was committed
--   ready_at          it first answered HTTP (NULL if it never did)
--   terminated_at     its end was recorded; for an exit Docker reported, the
--                     container's exit time (FinishedAt or the die event)
--   seconds_to_ready  ready_at - scheduled_at
--   lifetime_seconds  terminated_at - scheduled_at (NULL while it lives)
--   exit_code         the main process's exit code (NULL: none known)
--   reason            Plane's termination reason (external, swept, keyexpired,
--                     lost, startuptimeout, internalerror), NULL when nobody
--                     asked it to end (it exited on its own)
--   termination       'soft', 'hard' or NULL (not asked to end)
--   last_status       the status it had before terminating
CREATE VIEW backend_lifetimes AS
SELECT
    id,
    image,
    scheduled_at,
    ready_at,
    terminated_at,
    (ready_at - scheduled_at) / 1000.0 AS seconds_to_ready,
    (terminated_at - scheduled_at) / 1000.0 AS lifetime_seconds,
    exit_code,
    reason,
    status,
    termination,
    last_status,
    oom_killed,
    error
FROM (
    SELECT
        b.id AS id,
        b.image AS image,
        b.created_at_ms AS scheduled_at,
        (SELECT MIN(e.timestamp_ms) FROM backend_events e
          WHERE e.backend_id = b.id AND e.status = 'ready') AS ready_at,
        (SELECT e.timestamp_ms FROM backend_events e
          WHERE e.backend_id = b.id AND e.status = 'terminated') AS terminated_at,
        b.exit_code AS exit_code,
        json_extract(b.state, '$.reason') AS reason,
        b.status AS status,
        json_extract(b.state, '$.termination') AS termination,
        json_extract(b.state, '$.last_status') AS last_status,
        b.oom_killed AS oom_killed,
        b.error AS error
    FROM backends b
);

-- How backends of each image ended: one row per (image, exit_code) among
-- terminated backends. `unrequested` counts those that ended without anyone
-- asking (their own exit, a crash, an external kill).
CREATE VIEW exit_codes_by_image AS
SELECT
    image,
    exit_code,
    COUNT(*) AS backends,
    SUM(termination IS NULL) AS unrequested,
    MIN(terminated_at) AS first_at,
    MAX(terminated_at) AS last_at
FROM backend_lifetimes
WHERE status = 'terminated'
GROUP BY image, exit_code;
