-- Consumes that arrive together commit together (ADR 15): one call, one transaction, one commit
-- (in production one round trip to the synchronous standby) for the whole batch. First the batch
-- locks its users' balance rows, skipping any another transaction holds: a batch never waits for
-- a lock, so it never holds some users' rows while waiting for another's (nor deadlocks). A
-- consume whose user was skipped answers 'busy' and billing sends it again alone, where it waits
-- for the lock as any single movement does. The rest is billing_move for each consume, in user id
-- order and, for one user, in arrival order: the second of two with one key replays the first.
-- i: the consume's position in the arrays (1-based).
CREATE FUNCTION billing_move_many(p_users uuid[], p_amounts bigint[], p_keys text[], p_reqs text[], p_descriptions text[])
RETURNS TABLE (i integer, outcome text, transaction_id bigint, balance bigint) LANGUAGE plpgsql AS $$
DECLARE
    mine uuid[];
BEGIN
    SELECT coalesce(array_agg(b.user_id), '{}') INTO mine FROM (
        SELECT c.user_id FROM credit_balances c WHERE c.user_id = ANY(p_users) ORDER BY c.user_id FOR UPDATE SKIP LOCKED) b;
    FOR i IN SELECT u.n FROM unnest(p_users) WITH ORDINALITY AS u(id, n) ORDER BY u.id, u.n LOOP
        IF p_users[i] = ANY(mine) OR NOT EXISTS (SELECT 1 FROM credit_balances c WHERE c.user_id = p_users[i]) THEN
            SELECT m.outcome, m.transaction_id, m.balance INTO outcome, transaction_id, balance
            FROM billing_move(p_users[i], 'consume', -p_amounts[i], p_keys[i], p_reqs[i], p_descriptions[i]) m;
        ELSE
            outcome := 'busy'; transaction_id := NULL; balance := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
