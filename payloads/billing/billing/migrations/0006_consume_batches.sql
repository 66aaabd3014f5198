-- Consumes that arrive together commit together (ADR 15): one call, one transaction, one commit
-- (in production one round trip to the synchronous standby) for the whole batch. Each consume is
-- billing_move as before; the users' balance rows are locked in user id order (a consume's only
-- other locks are its own user's holds), so two batches never deadlock, nor a batch and a single
-- movement, which locks one balance. A user's consumes keep their order (ORDER BY id, n), and the
-- second of two with one key replays the first. i: the consume's position in the arrays (1-based).
CREATE FUNCTION billing_move_many(p_users uuid[], p_amounts bigint[], p_keys text[], p_reqs text[], p_descriptions text[])
RETURNS TABLE (i integer, outcome text, transaction_id bigint, balance bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN SELECT u.n FROM unnest(p_users) WITH ORDINALITY AS u(id, n) ORDER BY u.id, u.n LOOP
        SELECT m.outcome, m.transaction_id, m.balance INTO outcome, transaction_id, balance
        FROM billing_move(p_users[i], 'consume', -p_amounts[i], p_keys[i], p_reqs[i], p_descriptions[i]) m;
        RETURN NEXT;
    END LOOP;
END $$;
