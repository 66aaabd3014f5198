-- API keys for server agents (ADR 17): only a hash is kept (sha256 of a 256-bit random key: no
-- slow hash needed), with a prefix to tell keys apart, a name, when it was revoked and last used.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix        text NOT NULL,
    key_hash      bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
