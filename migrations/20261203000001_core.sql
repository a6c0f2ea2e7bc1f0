-- The drover instance this database belongs to: created once, with the database.
-- Its id labels every container the instance owns.
CREATE TABLE instance (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    instance_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);

-- Small named values the daemon keeps across restarts (e.g. the Docker event watermark).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per backend: what is desired of it, and what is known of it now.
CREATE TABLE backends (
    id TEXT PRIMARY KEY,
    -- The executor spec (Plane's DockerExecutorConfig JSON).
    spec TEXT NOT NULL,
    image TEXT NOT NULL,
    -- 'running' or 'terminated': written by users, read by the reconciler.
    desired TEXT NOT NULL CHECK (desired IN ('running', 'terminated')),
    -- The termination that was requested, if any.
    termination_kind TEXT CHECK (termination_kind IN ('soft', 'hard')),
    termination_reason TEXT,
    -- Current status and Plane-shaped state JSON, as last recorded.
    status TEXT NOT NULL,
    state TEXT NOT NULL,
    container_id TEXT,
    address TEXT,
    exit_code INTEGER,
    oom_killed INTEGER,
    error TEXT,
    -- Deadlines, in ms since the epoch: readiness must come before the first,
    -- a soft termination escalates to SIGKILL at the second.
    startup_deadline_ms INTEGER,
    kill_deadline_ms INTEGER,
    -- The last signal sent to the container and when (so a restart neither
    -- forgets nor floods it).
    last_signal TEXT,
    last_signal_at_ms INTEGER,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE INDEX backends_live ON backends (status) WHERE status <> 'terminated';

-- Every status transition of every backend, append-only.
CREATE TABLE backend_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL REFERENCES backends (id),
    status TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    -- How the transition was learned: 'api', 'reconciler', 'docker-event',
    -- 'inspect' (an exit found by a resync) or 'missing' (the container vanished).
    source TEXT NOT NULL,
    error TEXT,
    timestamp_ms INTEGER NOT NULL
);

CREATE INDEX backend_events_by_backend ON backend_events (backend_id, event_id);
CREATE INDEX backend_events_by_time ON backend_events (timestamp_ms);

-- An exit is recorded once: at most one terminated row per backend.
CREATE UNIQUE INDEX backend_events_one_terminated
    ON backend_events (backend_id) WHERE status = 'terminated';

CREATE TRIGGER backend_events_no_update BEFORE UPDATE ON backend_events
BEGIN
    SELECT RAISE(ABORT, 'backend_events is append-only');
END;

CREATE TRIGGER backend_events_no_delete BEFORE DELETE ON backend_events
BEGIN
    SELECT RAISE(ABORT, 'backend_events is append-only');
END;

-- Each time the Docker engine stopped answering, and when it came back.
CREATE TABLE docker_outages (
    outage_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER,
    -- What noticed it: 'event-stream', 'resync', 'action' or 'startup'.
    noticed_by TEXT NOT NULL,
    detail TEXT
);
