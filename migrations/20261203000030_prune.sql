-- One row per prune pass (every prune.interval, or on POST /v1/prune). The row
-- is written when the pass starts and completed when it ends, so a pass cut
-- short by a crash shows as a row without finished_at.
-- Times are milliseconds since the Unix epoch, as everywhere in this database.
CREATE TABLE prune_runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    -- 'interval' (the daemon's timer) or 'api' (POST /v1/prune).
    triggered_by TEXT NOT NULL,
    containers_removed INTEGER NOT NULL DEFAULT 0,
    images_removed INTEGER NOT NULL DEFAULT 0,
    -- Writable layers of the removed containers plus the images Docker deleted.
    bytes_reclaimed INTEGER NOT NULL DEFAULT 0,
    -- What went wrong, if anything (the pass goes on past a failed removal).
    error TEXT
);

CREATE INDEX prune_runs_by_start ON prune_runs (started_at);

-- Images drover itself brought to the host: only these may be pruned, never
-- an image someone else put there. A row is written when a pull of an image
-- that was absent succeeds, touched whenever a backend starts with the image,
-- and deleted when a prune removes the image.
CREATE TABLE pulled_images (
    -- The reference as backends name it (the spec's `image`).
    image TEXT PRIMARY KEY,
    -- The image id (sha256:...) the reference named after drover's last pull:
    -- if the reference later names another image, that one is not drover's.
    digest TEXT,
    first_pulled_at_ms INTEGER NOT NULL,
    last_used_at_ms INTEGER NOT NULL
);

-- Prune asks "does any backend use this image", per image.
CREATE INDEX backends_by_image ON backends (image);
