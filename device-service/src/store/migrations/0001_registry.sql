-- The device registry, one-time enrolment codes, and the outbox of bus messages
-- committed with a change.

CREATE TABLE devices (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    external_id   text UNIQUE,
    type          text,
    groups        text[] NOT NULL DEFAULT '{}',
    attributes    jsonb NOT NULL DEFAULT '{}',
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    -- The first connect seen, and the latest connect or disconnect.
    activated_at  timestamptz,
    last_seen     timestamptz,
    -- The latest revocation (disable): tokens issued at or before it are refused.
    revoked_at    timestamptz
);
CREATE INDEX devices_groups ON devices USING gin (groups);
CREATE INDEX devices_enabled ON devices (enabled, id);

CREATE TABLE enrolments (
    -- SHA-256 of the normalized code: the code itself is never stored.
    code_hash   bytea PRIMARY KEY,
    device      uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX enrolments_device ON enrolments (device);
CREATE INDEX enrolments_expires ON enrolments (expires_at);

CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    message_id   uuid NOT NULL,
    headers      jsonb NOT NULL,
    body         bytea NOT NULL,
    persistent   boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
