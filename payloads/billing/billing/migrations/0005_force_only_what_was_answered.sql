-- Review of #14: a forced debit replays only the capture of the same hold (the one movement that
-- may already have charged its call under its key); a key that any other movement used is a
-- conflict, never a silent "replayed" that charges nothing. And a capture names a released or void
-- hold as such once its TTL has passed too (it said 'expired', which a forced capture would charge).
CREATE OR REPLACE FUNCTION billing_force(p_user uuid, p_amount bigint, p_key text, p_req text, p_description text, p_hold uuid,
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
        SELECT t.id, t.amount, t.type, t.ref INTO prior FROM transactions t WHERE t.user_id = p_user AND t.idempotency_key = p_key;
        IF FOUND THEN
            -- Only the capture of the same hold settled this call already; any other movement under
            -- the key (a consume, a signup...) is another operation: the key is reused.
            IF prior.type = 'capture' AND p_hold IS NOT NULL AND prior.ref = p_hold::text THEN
                outcome := 'replayed'; transaction_id := prior.id; taken := -prior.amount; shortfall := 0;
            ELSE
                outcome := 'conflict';
            END IF;
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

CREATE OR REPLACE FUNCTION billing_capture(p_hold uuid, p_amount bigint,
                                OUT outcome text, OUT transaction_id bigint, OUT balance bigint, OUT detail bigint)
LANGUAGE plpgsql AS $$
DECLARE
    l record;
    take bigint;
    r transactions;
BEGIN
    l := billing_lock_hold(p_hold);
    IF (l.hold).id IS NULL THEN
        outcome := 'not_found'; RETURN;
    END IF;
    take := coalesce(p_amount, (l.hold).amount);
    balance := (l.h).balance;
    IF take > (l.hold).amount THEN
        outcome := 'too_much'; detail := (l.hold).amount; RETURN;
    END IF;
    IF (l.hold).status = 'captured' THEN
        outcome := CASE WHEN p_amount IS NOT NULL AND p_amount <> (l.hold).captured THEN 'conflict' ELSE 'replayed' END;
        transaction_id := (l.hold).transaction_id; detail := (l.hold).captured; RETURN;
    END IF;
    IF (l.hold).status <> 'active' OR l.overdue THEN
        -- Only an active hold past its TTL (or one the sweeper expired) is 'expired', which a forced
        -- capture charges; a released or void hold stays what it is, however old.
        outcome := CASE WHEN (l.hold).status IN ('active', 'expired') THEN 'expired' ELSE (l.hold).status END; RETURN;
    END IF;
    IF take > 0 THEN
        -- request_hash as chain.request_hash("capture", hold=..., amount=take) writes it
        r := billing_append(l.h, 'capture', -take, (l.hold).amount, 'hold:' || p_hold,
                            encode(sha256(convert_to('{"amount":' || take || ',"hold":"' || p_hold || '","op":"capture"}', 'UTF8')), 'hex'),
                            NULL, p_hold::text);
        transaction_id := r.id; balance := r.available_after;
    ELSE
        balance := balance + (l.hold).amount;
        UPDATE credit_balances SET balance = billing_capture.balance, updated_at = now() WHERE user_id = (l.h).user_id;
    END IF;
    UPDATE holds SET status = 'captured', captured = take, transaction_id = r.id, settled_at = now() WHERE id = p_hold;
    outcome := 'done';
END $$;
