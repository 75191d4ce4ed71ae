"""The store's multi-row INSERTs: few distinct statements, every row written once, in order."""

from __future__ import annotations

import sqlite3

from dongne.store import MAX_ROWS_PER_STATEMENT, PreparedCommit


def test_inserts_come_in_powers_of_two_up_to_the_cap() -> None:
    texts = set()
    for n in range(1, 3 * MAX_ROWS_PER_STATEMENT + 2):
        batch = PreparedCommit(max_variables=32766)
        batch.insert("INSERT INTO t (a, b)", [(i, -i) for i in range(n)])
        sizes = [len(params) // 2 for _sql, params, _many in batch.statements]
        assert sum(sizes) == n == batch.rows
        assert all(size & (size - 1) == 0 and size <= MAX_ROWS_PER_STATEMENT for size in sizes)
        assert [p for _sql, params, _many in batch.statements for p in params] == [x for i in range(n) for x in (i, -i)]
        texts.update(sql for sql, _params, _many in batch.statements)
    # One compiled statement per power of two: the sqlite3 module's cache
    # (128 per connection) holds them all, whatever the commit sizes.
    assert len(texts) == MAX_ROWS_PER_STATEMENT.bit_length()


def test_the_parameter_limit_still_bounds_a_statement() -> None:
    batch = PreparedCommit(max_variables=999)
    batch.insert("INSERT INTO t (a, b, c, d, e, f, g, h, i, j)", [tuple(range(10))] * 500)
    sizes = [len(params) // 10 for _sql, params, _many in batch.statements]
    assert sum(sizes) == 500
    assert max(sizes) == 64  # 999 // 10 = 99 rows at most: the power of two below

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a, b, c, d, e, f, g, h, i, j)")
    for sql, params, _many in batch.statements:
        conn.execute(sql, params)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (500,)
