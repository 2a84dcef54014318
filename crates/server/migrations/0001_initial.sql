-- The server's durable state. Nodes are not stored: they announce themselves
-- again (Register) whenever they connect.

CREATE TABLE namespaces (
    name        TEXT PRIMARY KEY NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Only the SHA-256 of a key is kept; the key itself is shown once.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    namespace   TEXT NOT NULL REFERENCES namespaces (name),
    key_sha256  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- seq orders sandboxes by creation (list order and cursors); created_at
-- alone cannot, as many are created within one millisecond.
CREATE TABLE sandboxes (
    id                 TEXT PRIMARY KEY NOT NULL,
    seq                INTEGER NOT NULL UNIQUE,
    namespace          TEXT NOT NULL,
    state              TEXT NOT NULL,
    reason             TEXT,
    exit_code          INTEGER,
    node               TEXT,
    spec               TEXT NOT NULL,
    tags               TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    finished_at        INTEGER,
    deadline           INTEGER NOT NULL,
    idle_timeout_secs  INTEGER,
    stop_reason        TEXT,
    stop_grace_secs    INTEGER,
    deleted            INTEGER NOT NULL DEFAULT 0,
    updated_at         INTEGER NOT NULL
);

CREATE INDEX sandboxes_live ON sandboxes (deleted, namespace, seq);

CREATE TABLE idempotency_keys (
    namespace   TEXT NOT NULL,
    key         TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    sandbox_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
