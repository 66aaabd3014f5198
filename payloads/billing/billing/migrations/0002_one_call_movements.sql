-- One database call per money movement (issue #15). Each function runs the steps the service used
-- to send one by one (lock the user's balance row, check the idempotency key, append, move the
-- head) as one round trip. Inside a volatile PL/pgSQL function every statement takes a fresh
-- snapshot, so the key lookup after the lock sees a concurrent twin's committed row and replays it.
-- The row hash is computed here exactly as chain.canonical does in Python (verify-ledger
-- recomputes it there). Outcomes are words the service maps to HTTP answers (ledger.py).

-- A user's overdue holds are found without scanning everyone's (holds_active_expiry is the sweeper's).
CREATE INDEX holds_user_active_expiry ON holds (user_id, expires_at) WHERE status = 'active';

-- A JSON string as Python's json.dumps(ensure_ascii=True) writes it: DEL and non-ASCII as \uXXXX,
-- astral characters as surrogate pairs. PostgreSQL's to_json already escapes quotes, backslashes
-- and control characters the way Python does.
CREATE FUNCTION billing_json_escaped(t text) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT string_agg(CASE
               WHEN ascii(c) < 127 THEN c
               WHEN ascii(c) < 65536 THEN '\u' || lpad(to_hex(ascii(c)), 4, '0')
               ELSE '\u' || to_hex(55296 + ((ascii(c) - 65536) >> 10)) || '\u' || to_hex(56320 + ((ascii(c) - 65536) & 1023))
           END, '' ORDER BY n)
    FROM regexp_split_to_table(to_json(t)::text, '') WITH ORDINALITY AS x(c, n)
$$;

-- One expression, so the planner inlines it (STABLE like to_json, or it would not): printable ASCII
-- (every key, hash and type) costs no function call.
CREATE FUNCTION billing_json(t text) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN t IS NULL THEN 'null' WHEN t ~ '^[\x20-\x7e]*$' THEN to_json(t)::text ELSE billing_json_escaped(t) END
$$;

-- chain.canonical: the row's fields as sorted-key JSON without spaces.
CREATE FUNCTION billing_canonical(r transactions) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT '{"amount":' || r.amount || ',"available_after":' || r.available_after || ',"balance_after":' || r.balance_after
        || ',"created_at":"' || to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        || '","description":' || billing_json(r.description) || ',"idempotency_key":' || billing_json(r.idempotency_key)
        || ',"ref":' || billing_json(r.ref) || ',"request_hash":' || billing_json(r.request_hash) || ',"seq":' || r.seq
        || ',"type":' || billing_json(r.type) || ',"user_id":"' || r.user_id || '"}'
$$;

-- Append one transaction to the chain of h (the caller holds h's lock) and move the head.
-- held_change: holds settled in the same step, returned to the available balance.
CREATE FUNCTION billing_append(h credit_balances, p_type text, p_amount bigint, p_held_change bigint, p_key text,
                               p_req text, p_description text, p_ref text) RETURNS transactions LANGUAGE plpgsql AS $$
DECLARE
    r transactions;
BEGIN
    r.user_id := h.user_id; r.seq := h.last_seq + 1; r.type := p_type; r.amount := p_amount;
    r.balance_after := h.settled + p_amount; r.available_after := h.balance + p_amount + p_held_change;
    r.idempotency_key := p_key; r.request_hash := p_req; r.description := p_description; r.ref := p_ref;
    r.created_at := clock_timestamp(); r.prev_hash := h.last_hash;  -- after the lock: in chain order
    r.hash := sha256(h.last_hash || convert_to(billing_canonical(r), 'UTF8'));
    INSERT INTO transactions (user_id, seq, type, amount, balance_after, available_after, idempotency_key,
                              request_hash, description, ref, created_at, prev_hash, hash)
    VALUES (r.user_id, r.seq, r.type, r.amount, r.balance_after, r.available_after, r.idempotency_key,
            r.request_hash, r.description, r.ref, r.created_at, r.prev_hash, r.hash)
    RETURNING id INTO r.id;
    UPDATE credit_balances SET balance = r.available_after, settled = r.balance_after, last_seq = r.seq,
                               last_hash = r.hash, updated_at = now()
    WHERE user_id = h.user_id;
    RETURN r;
END $$;

-- Mark a user's overdue active holds expired (the caller holds the balance lock); returns the cents freed.
CREATE FUNCTION billing_expire_holds_of(p_user uuid) RETURNS bigint LANGUAGE sql AS $$
    WITH freed AS (
        UPDATE holds SET status = 'expired', settled_at = now()
        WHERE user_id = p_user AND status = 'active' AND expires_at <= now() RETURNING amount)
    SELECT coalesce(sum(amount), 0)::bigint FROM freed
$$;

-- Consume (negative amount) or grant (positive) under an idempotency key.
-- outcome: done | replayed | conflict | insufficient | not_found; balance: the available balance.
CREATE FUNCTION billing_move(p_user uuid, p_type text, p_amount bigint, p_key text, p_req text, p_description text,
                             OUT outcome text, OUT transaction_id bigint, OUT balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    h credit_balances;
    prior record;
    r transactions;
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
        outcome := 'insufficient'; balance := h.balance; RETURN;
    END IF;
    r := billing_append(h, p_type, p_amount, 0, p_key, p_req, p_description, NULL);
    outcome := 'done'; transaction_id := r.id; balance := r.available_after;
END $$;

-- Reserve credits for a call whose cost is known afterwards. The user's overdue holds go first.
-- outcome: done | replayed | conflict | insufficient | not_found.
CREATE FUNCTION billing_hold(p_user uuid, p_amount bigint, p_key text, p_req text, p_ttl_seconds integer, p_id uuid,
                             OUT outcome text, OUT hold_id uuid, OUT balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    h credit_balances;
    prior record;
    freed bigint;
BEGIN
    SELECT * INTO h FROM credit_balances WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found'; RETURN;
    END IF;
    freed := billing_expire_holds_of(p_user);
    balance := h.balance + freed;
    SELECT x.id, x.request_hash INTO prior FROM holds x WHERE x.user_id = p_user AND x.idempotency_key = p_key;
    IF FOUND THEN
        outcome := CASE WHEN prior.request_hash = p_req THEN 'replayed' ELSE 'conflict' END;
        hold_id := prior.id;
    ELSIF balance < p_amount THEN
        outcome := 'insufficient';
    ELSE
        INSERT INTO holds (id, user_id, amount, idempotency_key, request_hash, expires_at)
        VALUES (p_id, p_user, p_amount, p_key, p_req, now() + p_ttl_seconds * interval '1 second');
        outcome := 'done'; hold_id := p_id; balance := balance - p_amount;
    END IF;
    IF balance <> h.balance THEN
        UPDATE credit_balances SET balance = billing_hold.balance, updated_at = now() WHERE user_id = p_user;
    END IF;
END $$;

-- Lock a hold for settling: its user's balance row first, then the hold (the one lock order).
CREATE FUNCTION billing_lock_hold(p_hold uuid, OUT h credit_balances, OUT hold holds, OUT overdue boolean)
LANGUAGE plpgsql AS $$
DECLARE
    owner uuid;
BEGIN
    SELECT user_id INTO owner FROM holds WHERE id = p_hold;
    IF FOUND THEN
        SELECT * INTO h FROM credit_balances WHERE user_id = owner FOR UPDATE;
        SELECT * INTO hold FROM holds WHERE id = p_hold FOR UPDATE;
        overdue := hold.expires_at <= now();
    END IF;
END $$;

-- Capture all of a hold or part of it (p_amount NULL: all); the rest returns to the balance.
-- outcome: done | replayed | too_much | conflict (captured for another amount) | expired | released | not_found;
-- detail: the hold's amount (too_much) or the amount it was captured for (conflict).
CREATE FUNCTION billing_capture(p_hold uuid, p_amount bigint,
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
        outcome := CASE WHEN l.overdue OR (l.hold).status = 'expired' THEN 'expired' ELSE (l.hold).status END; RETURN;
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

-- Release a hold (idempotent). outcome: done | conflict (it was captured) | not_found; status: released | expired.
CREATE FUNCTION billing_release(p_hold uuid, OUT outcome text, OUT status text, OUT balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    l record;
BEGIN
    l := billing_lock_hold(p_hold);
    IF (l.hold).id IS NULL THEN
        outcome := 'not_found'; RETURN;
    END IF;
    balance := (l.h).balance;
    status := (l.hold).status;
    IF status = 'captured' THEN
        outcome := 'conflict'; RETURN;
    END IF;
    IF status = 'active' THEN
        status := CASE WHEN l.overdue THEN 'expired' ELSE 'released' END;
        balance := balance + (l.hold).amount;
        UPDATE credit_balances SET balance = billing_release.balance, updated_at = now() WHERE user_id = (l.h).user_id;
        UPDATE holds SET status = billing_release.status, settled_at = now() WHERE id = p_hold;
    END IF;
    outcome := 'done';
END $$;

-- The sweeper: release one user's overdue holds under their balance lock. Returns the cents freed.
CREATE FUNCTION billing_sweep(p_user uuid) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    freed bigint;
BEGIN
    PERFORM 1 FROM credit_balances WHERE user_id = p_user FOR UPDATE;
    freed := billing_expire_holds_of(p_user);
    IF freed > 0 THEN
        UPDATE credit_balances SET balance = balance + freed, updated_at = now() WHERE user_id = p_user;
    END IF;
    RETURN freed;
END $$;
