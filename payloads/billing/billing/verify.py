"""`python -m billing verify-ledger`: recompute every user's hash chain and running balance, check
each balance row against its chain and active holds, and each forced debit against the transaction
that took it. Names the first broken row. Also counts negative balances (which the database's
CHECK forbids: only a change behind the ledger's back makes one)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from billing import chain


@dataclass
class Report:
    users: int = 0
    transactions: int = 0
    forced: int = 0
    shortfall: int = 0  # cents forced debits could not take (the balance had reached zero)
    negative: int = 0  # accounts whose balance is below zero
    problem: str | None = None


def verify(database_url: str) -> Report:
    report = Report()
    # An unreachable member costs seconds, not the system default (often minutes).
    timeout = {} if "connect_timeout" in conninfo_to_dict(database_url) else {"connect_timeout": 10}
    with psycopg.connect(database_url, row_factory=dict_row, **timeout) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one consistent snapshot
        report.negative = conn.execute(
            "SELECT count(*) AS n FROM credit_balances WHERE balance < 0 OR settled < 0").fetchone()["n"]
        heads = conn.execute(
            """SELECT b.user_id, b.balance, b.settled, b.last_seq, b.last_hash,
                      COALESCE((SELECT sum(amount) FROM holds h WHERE h.user_id = b.user_id AND h.status = 'active'), 0) AS held
               FROM credit_balances b ORDER BY b.user_id"""
        ).fetchall()
        for head in heads:
            report.users += 1
            prev, total, seq = chain.GENESIS, 0, 0
            rows = conn.execute("SELECT * FROM transactions WHERE user_id = %s ORDER BY seq", (head["user_id"],))
            for row in rows:
                report.transactions += 1
                where = f"transaction {row['id']} (user {row['user_id']}, seq {row['seq']})"
                seq += 1
                total += row["amount"]
                if row["seq"] != seq:
                    return _broken(report, f"{where}: expected seq {seq} (a row is missing)")
                if bytes(row["prev_hash"]) != prev:
                    return _broken(report, f"{where}: prev_hash does not match the previous row")
                if chain.row_hash(prev, row) != bytes(row["hash"]):
                    return _broken(report, f"{where}: hash mismatch (the row was altered)")
                if row["balance_after"] != total:
                    return _broken(report, f"{where}: balance_after {row['balance_after']} but the transactions sum to {total}")
                prev = bytes(row["hash"])
            user = f"user {head['user_id']}"
            if head["last_seq"] != seq or bytes(head["last_hash"]) != prev:
                return _broken(report, f"{user}: balance row does not point at the end of the chain (seq {seq})")
            if head["settled"] != total or head["balance"] != total - head["held"]:
                return _broken(report, f"{user}: balance {head['balance']} but transactions {total} - active holds {head['held']} = {total - head['held']}")
        for f in conn.execute(
            """SELECT f.user_id, f.idempotency_key, f.taken, f.shortfall, t.user_id AS t_user,
                      t.idempotency_key AS t_key, t.type AS t_type, t.amount AS t_amount
               FROM forced_debits f LEFT JOIN transactions t ON t.id = f.transaction_id ORDER BY f.created_at"""
        ):
            report.forced += 1
            report.shortfall += f["shortfall"]
            where = f"forced debit {f['idempotency_key']!r} (user {f['user_id']})"
            if f["taken"] and (f["t_type"] != "forced" or f["t_amount"] != -f["taken"] or f["t_user"] != f["user_id"]
                               or f["t_key"] != f["idempotency_key"]):
                return _broken(report, f"{where}: its transaction does not take {f['taken']} under its key")
        orphans = conn.execute("SELECT count(*) AS n FROM transactions t WHERE NOT EXISTS (SELECT 1 FROM credit_balances b WHERE b.user_id = t.user_id)").fetchone()
        if orphans["n"]:
            return _broken(report, f"{orphans['n']} transaction(s) belong to no balance row")
        if report.negative:
            return _broken(report, f"{report.negative} account(s) have a negative balance")
    return report


def _broken(report: Report, problem: str) -> Report:
    report.problem = problem
    return report
