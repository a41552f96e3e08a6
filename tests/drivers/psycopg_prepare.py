"""psycopg 3 server-side prepared statements through pgbudget in transaction mode.

CLIENTS connections (default prepare_threshold = 5) share SHARE server connections; each executes the same 3
parameterized queries ROUNDS times, so from the 6th execution on psycopg sends them as named statements
_pg3_0.._pg3_2 (the same names in every connection, for different connections' statements). Odd connections
wrap each round in a transaction. Then one connection queues 50 executes in `conn.pipeline()`. Every result
is checked; the peak of server connections seen by a direct sampler must stay within SHARE.
"""

import asyncio
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DIRECT_DSN, PROXY_DSN, Failures, describe, error_kind, run_async  # noqa: E402

import psycopg  # noqa: E402

CLIENTS = int(os.environ.get("CLIENTS", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "30"))
SHARE = int(os.environ.get("SHARE", "2"))
PIPELINED = 50

F = Failures("psycopg_prepare_threshold")
executed = 0
prepared_names = []
errors = collections.Counter()
SERVER_CONNS = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def expect(cond, where, what, got):
    if not cond:
        raise AssertionError(f"{where}: {what}: got {got!r}")


async def round_(conn, w, i):
    global executed
    cur = await conn.execute("SELECT %s::int * %s::int AS p", (w, i))
    row = await cur.fetchone()
    expect(row == (w * i,), f"conn {w} round {i}", "product", row)
    cur = await conn.execute("SELECT %s::text || '/' || %s::text AS s, length(%s::text) AS n", (f"c{w}", i, f"c{w}"))
    row = await cur.fetchone()
    expect(row == (f"c{w}/{i}", len(f"c{w}")), f"conn {w} round {i}", "concat", row)
    cur = await conn.execute("SELECT g FROM generate_series(%s::int, %s::int) AS g ORDER BY g", (i, i + w % 3))
    rows = await cur.fetchall()
    expect(rows == [(g,) for g in range(i, i + w % 3 + 1)], f"conn {w} round {i}", "series", rows)
    executed += 3


async def worker(w):
    conn = await psycopg.AsyncConnection.connect(PROXY_DSN, autocommit=True, connect_timeout=10)
    try:
        expect(conn.prepare_threshold == 5, f"conn {w}", "default prepare_threshold", conn.prepare_threshold)
        for i in range(ROUNDS):
            if w % 2:
                async with conn.transaction():
                    await round_(conn, w, i)
            else:
                await round_(conn, w, i)
        # psycopg's own bookkeeping (private API): the 3 queries are prepared server-side by now.
        names = getattr(getattr(conn, "_prepared", None), "_names", None)
        if names is not None:
            prepared_names.append(len(names))
    finally:
        await conn.close()


async def pipeline():
    global executed
    conn = await psycopg.AsyncConnection.connect(PROXY_DSN, autocommit=True, connect_timeout=10)
    try:
        cursors = []
        async with conn.pipeline():
            for i in range(PIPELINED):
                cursors.append(await conn.execute("SELECT %s::int * 3 AS t, %s::text AS s", (i, f"p{i}")))
        for i, cur in enumerate(cursors):
            row = await cur.fetchone()
            expect(row == (3 * i, f"p{i}"), "pipeline", f"execute {i}", row)
        executed += PIPELINED
    finally:
        await conn.close()


async def sampler(stop, samples):
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as c:
        while not stop.is_set():
            cur = await c.execute(SERVER_CONNS)
            samples.append((await cur.fetchone())[0])
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass


async def main():
    stop, samples = asyncio.Event(), []
    sampling = asyncio.create_task(sampler(stop, samples))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    results = await asyncio.gather(*(worker(w) for w in range(CLIENTS)), return_exceptions=True)
    try:
        await pipeline()
        results.append(None)
    except Exception as e:  # noqa: BLE001
        results.append(e)
    elapsed = time.monotonic() - t0
    stop.set()
    await sampling
    for w, r in enumerate(results):
        if isinstance(r, BaseException):
            errors[error_kind(r)] += 1
            who = "pipeline connection" if w == CLIENTS else f"connection {w}"
            print(f"{who}: {describe(r)}", file=sys.stderr)
    for e, n in errors.most_common():
        F.add("clients", f"{n} of {CLIENTS + 1} connections failed with {e}")
    if prepared_names:
        F.check(min(prepared_names) >= 3, "prepare", f"psycopg prepared only {min(prepared_names)} statements")
    peak = max(samples, default=0)
    F.check(peak >= 1, "sampler", "never saw a server connection during the load (sampling is broken)")
    F.check(peak <= SHARE, "budget", f"peak of {peak} server connections, share is {SHARE}")
    return F.done(
        f"{CLIENTS} connections x {ROUNDS} rounds x 3 queries + {PIPELINED} pipelined: {executed} executes in "
        f"{elapsed:.1f} s, prepared per connection {sorted(set(prepared_names)) or '?'}, peak {peak} server "
        f"connections of share {SHARE}, {sum(errors.values())} failed connections"
    )


if __name__ == "__main__":
    run_async(main, F.scenario)
