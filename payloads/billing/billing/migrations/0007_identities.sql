-- Sign-in with Google and Apple (ADR 17): an identity (provider, subject) is exactly one user.
-- The primary key decides who creates a new identity's user when two regions see its first calls
-- at once; the foreign key is checked at commit so the identity row can be claimed first
-- (ledger.user_for_identity) and the user created only by the transaction that claimed it.
CREATE TABLE identities (
    provider    text NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_:.-]{0,31}$'),
    subject     text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    user_id     uuid NOT NULL UNIQUE REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subject)
);

-- A user who signed in with Google or Apple may have no e-mail address (Apple hides it) or share
-- one with an account an admin made: e-mail stays unique only where it is given.
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
