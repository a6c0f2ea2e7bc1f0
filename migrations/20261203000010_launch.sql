-- What a backend is launched with besides its spec, as Plane's drone passes it
-- to its runtime: the key the backend holds (name, namespace, tag) and its
-- fencing token, and the static token. The container sees them as
-- SESSION_BACKEND_KEY, SESSION_BACKEND_FENCING_TOKEN and
-- SESSION_BACKEND_STATIC_TOKEN. The static token is a secret: it is read only
-- to create the container, never shown by the API nor copied into history.
ALTER TABLE backends ADD COLUMN key_name TEXT;
ALTER TABLE backends ADD COLUMN key_namespace TEXT;
ALTER TABLE backends ADD COLUMN key_tag TEXT;
ALTER TABLE backends ADD COLUMN fencing_token INTEGER;
ALTER TABLE backends ADD COLUMN static_token TEXT;

-- Named consumers of the exit outbox (the terminated rows of backend_events)
-- and the last event each has acknowledged: a consumer resumes after it, so
-- every exit reaches it at least once, across restarts of either side.
-- History rows are never deleted for a consumer; only the cursor moves.
CREATE TABLE event_subscriptions (
    name TEXT PRIMARY KEY,
    acked_event_id INTEGER NOT NULL CHECK (acked_event_id >= 0),
    updated_at_ms INTEGER NOT NULL
);
