-- Settling what the proxy did while billing could not write (issue #14, ADR 8):
-- * forced debits: a charge for a call that was already answered (a stand-in advice, or a capture
--   whose hold expired meanwhile). It may take the available balance to zero, never below; what it
--   could not take is the shortfall, kept in forced_debits (the ledger of record for it).
-- * voids: the release of a hold by its idempotency key, for a placement whose outcome the proxy
--   never learnt. A void of a key no hold has yet leaves a 'void' row, so a placement arriving
--   later conflicts instead of locking the user's credit.
-- * consume frees the user's overdue holds before refusing for want of credit (reads already
--   exclude them: ledger.balance).

ALTER TABLE transactions DROP CONSTRAINT transactions_type_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_type_check
    CHECK (type IN ('signup', 'grant', 'consume', 'capture', 'purchase', 'refund', 'forced'));

ALTER TABLE holds DROP CONSTRAINT holds_status_check;
ALTER TABLE holds ADD CONSTRAINT holds_status_check CHECK (status IN ('active', 'captured', 'released', 'expired', 'void'));

CREATE TABLE forced_debits (
    user_id          uuid NOT NULL REFERENCES users (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash     text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    taken            bigint NOT NULL CHECK (taken >= 0 AND taken <= amount),
    shortfall        bigint GENERATED ALWAYS AS (amount - taken) STORED,
    transaction_id   bigint REFERENCES transactions (id),
    hold_id          uuid REFERENCES holds (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key),
    CHECK ((taken = 0) = (transaction_id IS NULL))
);
CREATE INDEX forced_debits_shortfall ON forced_debits (created_at) WHERE taken < amount;

CREATE FUNCTION billing_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER forced_debits_no_update BEFORE UPDATE OR DELETE ON forced_debits
    FOR EACH ROW EXECUTE FUNCTION billing_append_only();
CREATE TRIGGER forced_debits_no_truncate BEFORE TRUNCATE ON forced_debits
    FOR EACH STATEMENT EXECUTE FUNCTION billing_append_only();

-- Charge an answered call: min(p_amount, available balance). p_hold: the expired hold it settles
-- (marked captured for what was taken). outcome: done | replayed | conflict | not_found. A key
-- already charged by any movement (a capture that did commit, say) is replayed, never charged twice.
CREATE FUNCTION billing_force(p_user uuid, p_amount bigint, p_key text, p_req text, p_description text, p_hold uuid,
                              OUT outcome text, OUT transaction_id bigint, OUT balance bigint,
                              OUT taken bigint, OUT shortfall bigint) LANGUAGE plpgsql AS $$
DECLARE
    h credit_balances;
    prior record;
    r transactions;
BEGIN
    SELECT * INTO h FROM credit_balances WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found'; RETURN;
    END IF;
    h.balance := h.balance + billing_expire_holds_of(p_user);
    balance := h.balance;
    SELECT f.request_hash, f.transaction_id, f.taken, f.shortfall INTO prior
    FROM forced_debits f WHERE f.user_id = p_user AND f.idempotency_key = p_key;
    IF FOUND THEN
        outcome := CASE WHEN prior.request_hash = p_req THEN 'replayed' ELSE 'conflict' END;
        transaction_id := prior.transaction_id; taken := prior.taken; shortfall := prior.shortfall;
    ELSE
        SELECT t.id, t.amount INTO prior FROM transactions t WHERE t.user_id = p_user AND t.idempotency_key = p_key;
        IF FOUND THEN
            outcome := 'replayed'; transaction_id := prior.id; taken := -prior.amount; shortfall := 0;
        ELSE
            taken := least(p_amount, h.balance);
            shortfall := p_amount - taken;
            IF taken > 0 THEN
                r := billing_append(h, 'forced', -taken, 0, p_key, p_req, p_description, p_hold::text);
                transaction_id := r.id; balance := r.available_after;
            END IF;
            INSERT INTO forced_debits (user_id, idempotency_key, request_hash, amount, taken, transaction_id, hold_id)
            VALUES (p_user, p_key, p_req, p_amount, taken, transaction_id, p_hold);
            IF p_hold IS NOT NULL THEN
                UPDATE holds SET status = 'captured', captured = taken, transaction_id = r.id, settled_at = now()
                WHERE id = p_hold;
            END IF;
            outcome := 'done';
        END IF;
    END IF;
    IF taken = 0 OR outcome <> 'done' THEN  -- billing_append moved the head otherwise
        UPDATE credit_balances SET balance = h.balance, updated_at = now()
        WHERE user_id = p_user AND credit_balances.balance <> h.balance;
    END IF;
END $$;

-- Release the hold a key placed, or make sure it never will be. outcome: done | conflict (it was
-- captured) | not_found (no such user); status: released | expired | void.
CREATE FUNCTION billing_void(p_user uuid, p_key text, p_amount bigint,
                             OUT outcome text, OUT status text, OUT balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    h credit_balances;
    x holds;
BEGIN
    SELECT * INTO h FROM credit_balances WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found'; RETURN;
    END IF;
    balance := h.balance;
    SELECT * INTO x FROM holds WHERE user_id = p_user AND idempotency_key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO holds (id, user_id, amount, idempotency_key, request_hash, status, expires_at, settled_at)
        VALUES (gen_random_uuid(), p_user, p_amount, p_key, 'void', 'void', now(), now());
        outcome := 'done'; status := 'void'; RETURN;
    END IF;
    status := x.status;
    IF status = 'captured' THEN
        outcome := 'conflict'; RETURN;
    END IF;
    IF status = 'active' THEN
        status := CASE WHEN x.expires_at <= now() THEN 'expired' ELSE 'released' END;
        balance := balance + x.amount;
        UPDATE credit_balances SET balance = billing_void.balance, updated_at = now() WHERE user_id = p_user;
        UPDATE holds SET status = billing_void.status, settled_at = now() WHERE id = x.id;
    END IF;
    outcome := 'done';
END $$;

-- As in 0002, but a consume the available balance cannot cover first frees the user's overdue
-- holds (the sweeper runs every 2 s; a client must not get 402 for credit no hold still needs).
CREATE OR REPLACE FUNCTION billing_move(p_user uuid, p_type text, p_amount bigint, p_key text, p_req text, p_description text,
                                        OUT outcome text, OUT transaction_id bigint, OUT balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    h credit_balances;
    prior record;
    r transactions;
    freed bigint;
BEGIN
    SELECT * INTO h FROM credit_balances WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found'; RETURN;
    END IF;
    SELECT t.id, t.request_hash, t.available_after INTO prior
    FROM transactions t WHERE t.user_id = p_user AND t.idempotency_key = p_key;
    IF FOUND THEN
        outcome := CASE WHEN prior.request_hash = p_req THEN 'replayed' ELSE 'conflict' END;
        transaction_id := prior.id; balance := prior.available_after; RETURN;
    END IF;
    IF h.balance + p_amount < 0 THEN
        freed := billing_expire_holds_of(p_user);
        IF freed > 0 THEN
            h.balance := h.balance + freed;
            UPDATE credit_balances SET balance = h.balance, updated_at = now() WHERE user_id = p_user;
        END IF;
        IF h.balance + p_amount < 0 THEN
            outcome := 'insufficient'; balance := h.balance; RETURN;
        END IF;
    END IF;
    r := billing_append(h, p_type, p_amount, 0, p_key, p_req, p_description, NULL);
    outcome := 'done'; transaction_id := r.id; balance := r.available_after;
END $$;
