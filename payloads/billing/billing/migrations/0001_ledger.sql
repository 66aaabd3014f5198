-- The credit ledger (FSD §4.2): users, balances, an append-only hash-chained transaction log,
-- holds around calls whose cost is known only afterwards, Stripe purchases and processed events.
-- Money is integer US cents (bigint) everywhere.

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    email       text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- balance: what the user can spend now = sum of their transactions - their active holds.
-- settled/last_seq/last_hash: the head of the user's transaction chain.
CREATE TABLE credit_balances (
    user_id     uuid PRIMARY KEY REFERENCES users (id),
    balance     bigint NOT NULL CHECK (balance >= 0),
    settled     bigint NOT NULL CHECK (settled >= 0),
    last_seq    integer NOT NULL DEFAULT 0,
    last_hash   bytea NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (balance <= settled)
);

CREATE TABLE transactions (
    id               bigserial PRIMARY KEY,
    user_id          uuid NOT NULL REFERENCES users (id),
    seq              integer NOT NULL CHECK (seq > 0),
    type             text NOT NULL CHECK (type IN ('signup', 'grant', 'consume', 'capture', 'purchase', 'refund')),
    amount           bigint NOT NULL CHECK (amount <> 0),
    balance_after    bigint NOT NULL CHECK (balance_after >= 0),  -- sum of the user's transactions so far
    available_after  bigint NOT NULL CHECK (available_after >= 0),  -- what the response reported (holds aside)
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash     text NOT NULL,
    description      text CHECK (length(description) <= 200),
    ref              text,
    created_at       timestamptz NOT NULL,
    prev_hash        bytea NOT NULL,
    hash             bytea NOT NULL,
    UNIQUE (user_id, idempotency_key),
    UNIQUE (user_id, seq)
);
CREATE INDEX transactions_user_newest ON transactions (user_id, id DESC);

-- Append-only: no UPDATE, DELETE or TRUNCATE through the app's role. (The app role owns the
-- schema, so this is a guard against mistakes and casual edits; the hash chain catches the rest.)
CREATE FUNCTION transactions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'transactions is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER transactions_no_update BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION transactions_append_only();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION transactions_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON transactions FROM PUBLIC;

CREATE TABLE holds (
    id               uuid PRIMARY KEY,
    user_id          uuid NOT NULL REFERENCES users (id),
    amount           bigint NOT NULL CHECK (amount > 0),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash     text NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'captured', 'released', 'expired')),
    captured         bigint CHECK (captured >= 0 AND captured <= amount),
    transaction_id   bigint REFERENCES transactions (id),
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    settled_at       timestamptz,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE status = 'active';

CREATE TABLE purchases (
    session_id        text PRIMARY KEY,
    user_id           uuid NOT NULL REFERENCES users (id),
    credits           bigint NOT NULL CHECK (credits > 0),
    amount_paid       bigint NOT NULL CHECK (amount_paid >= 0),
    payment_intent    text,
    credits_refunded  bigint NOT NULL DEFAULT 0 CHECK (credits_refunded >= 0 AND credits_refunded <= credits),
    refund_shortfall  bigint NOT NULL DEFAULT 0 CHECK (refund_shortfall >= 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent);

CREATE TABLE stripe_events (
    id            text PRIMARY KEY,
    type          text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
