-- The fence (billing/db.py, issue #12): /health and every read commit one tiny write, which only
-- the writable primary confirms (with its synchronous standby). A real row write, refused on a
-- read-only server like any money movement. Backends spread over 1024 slots, so fences hardly
-- ever wait for one another and the table never grows past 1024 rows.
CREATE TABLE billing_fence (
    slot integer PRIMARY KEY,
    at timestamptz NOT NULL
);
