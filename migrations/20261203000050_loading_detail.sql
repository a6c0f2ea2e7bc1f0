-- The last progress line of a backend's image pull ("Downloading [==> ] 3MB/10MB",
-- "Status: Downloaded newer image for ..."), shown as its loading detail by the
-- API and `drover status`. Written at most about once a second while pulling,
-- never copied into backend_events (it is progress, not a transition).
ALTER TABLE backends ADD COLUMN loading_detail TEXT;
