"""CIRIS billing: pre-purchased credits, exactly-once consumption, a hash-chained ledger (FSD §4.2)."""
