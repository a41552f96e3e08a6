"""asyncpg statement-cache hammer through pgbudget in transaction mode.

CLIENTS asyncpg connections with the default statement cache (named prepared statements) share SHARE server
connections. Each runs ITERATIONS iterations mixing fetch, fetchval, fetchrow, executemany, a statement from
conn.prepare() reused across transactions and `async with conn.transaction()` blocks; every result is checked.
Meanwhile a direct connection samples the server connections in pg_stat_activity every 50 ms: the peak seen
during the load must not exceed SHARE.
"""

import asyncio
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DIRECT_DSN, PROXY_DSN, Failures, describe, error_kind, run_async  # noqa: E402

import asyncpg  # noqa: E402

CLIENTS = int(os.environ.get("CLIENTS", "50"))
ITERATIONS = int(os.environ.get("ITERATIONS", "100"))
SHARE = int(os.environ.get("SHARE", "5"))

F = Failures("asyncpg_statement_cache_hammer")
queries = 0
errors = collections.Counter()
SERVER_CONNS = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def expect(cond, w, i, what, got):
    if not cond:
        raise AssertionError(f"worker {w} iteration {i}: {what}: got {got!r}")


async def worker(w):
    global queries
    conn = await asyncpg.connect(PROXY_DSN, command_timeout=30)
    try:
        mult = await conn.prepare("SELECT $1::bigint * $2::bigint AS p")
        for i in range(ITERATIONS):
            n = i % 5 + 1
            rows = await conn.fetch("SELECT g, g * $1::int AS m FROM generate_series(1, $2::int) AS g", w + 1, n)
            expect([(r["g"], r["m"]) for r in rows] == [(g, g * (w + 1)) for g in range(1, n + 1)], w, i, "fetch", rows)
            v = await conn.fetchval("SELECT $1::int + $2::int", w, i)
            expect(v == w + i, w, i, "fetchval", v)
            r = await conn.fetchrow("SELECT $1::text || ':' || $2::int AS s, $2::int * 2 AS d", f"w{w}", i)
            expect((r["s"], r["d"]) == (f"w{w}:{i}", 2 * i), w, i, "fetchrow", r)
            await conn.executemany(
                "INSERT INTO hammer_log(worker, iter, k) VALUES ($1, $2, $3)", [(w, i, k) for k in range(3)]
            )
            p = await mult.fetchval(w, i)
            expect(p == w * i, w, i, "prepared statement reused", p)
            queries += 5
            if i % 2 == 0:
                async with conn.transaction():
                    await conn.execute("INSERT INTO hammer_tx(worker, iter) VALUES ($1, $2)", w, i)
                    c = await conn.fetchval("SELECT count(*) FROM hammer_tx WHERE worker = $1", w)
                    expect(c == i // 2 + 1, w, i, "count inside transaction", c)
                    p = await mult.fetchval(i, 3)
                    expect(p == 3 * i, w, i, "prepared statement inside transaction", p)
                queries += 5  # BEGIN, insert, count, prepared, COMMIT
    finally:
        await conn.close()


async def sampler(stop, samples):
    c = await asyncpg.connect(DIRECT_DSN)
    try:
        while not stop.is_set():
            samples.append(await c.fetchval(SERVER_CONNS))
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
    finally:
        await c.close()


async def main():
    setup = await asyncpg.connect(DIRECT_DSN)
    await setup.execute(
        "DROP TABLE IF EXISTS hammer_log, hammer_tx;"
        "CREATE TABLE hammer_log(worker int NOT NULL, iter int NOT NULL, k int NOT NULL);"
        "CREATE TABLE hammer_tx(worker int NOT NULL, iter int NOT NULL)"
    )
    await setup.close()

    stop, samples = asyncio.Event(), []
    sampling = asyncio.create_task(sampler(stop, samples))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    results = await asyncio.gather(*(worker(w) for w in range(CLIENTS)), return_exceptions=True)
    elapsed = time.monotonic() - t0
    stop.set()
    await sampling

    for w, r in enumerate(results):
        if isinstance(r, BaseException):
            errors[error_kind(r)] += 1
            if sum(errors.values()) <= 5:
                print(f"worker {w}: {describe(r)}", file=sys.stderr)
    for e, n in errors.most_common():
        F.add("clients", f"{n} of {CLIENTS} workers failed with {e}")

    check = await asyncpg.connect(DIRECT_DSN)
    log_rows, log_sum = await check.fetchrow("SELECT count(*), coalesce(sum(k), 0) FROM hammer_log")
    tx_rows = await check.fetchval("SELECT count(*) FROM hammer_tx")
    after = await check.fetchval(SERVER_CONNS)
    await check.close()
    if not errors:
        F.check(log_rows == CLIENTS * ITERATIONS * 3, "executemany", f"hammer_log has {log_rows} rows, want {CLIENTS * ITERATIONS * 3}")
        F.check(log_sum == CLIENTS * ITERATIONS * 3, "executemany", f"sum(k) = {log_sum}, want {CLIENTS * ITERATIONS * 3}")
        want_tx = CLIENTS * ((ITERATIONS + 1) // 2)
        F.check(tx_rows == want_tx, "transaction", f"hammer_tx has {tx_rows} rows, want {want_tx}")

    peak = max(samples, default=0)
    F.check(len(samples) >= 5, "sampler", f"only {len(samples)} samples of pg_stat_activity during the load")
    F.check(peak >= 1, "sampler", "never saw a server connection during the load (sampling is broken)")
    F.check(peak <= SHARE, "budget", f"peak of {peak} server connections during the load, share is {SHARE}")
    F.check(after <= SHARE, "budget", f"{after} server connections after the load, share is {SHARE}")
    return F.done(
        f"{CLIENTS} clients x {ITERATIONS} iterations, {queries} statements in {elapsed:.1f} s "
        f"({queries / max(elapsed, 1e-9):.0f}/s), peak {peak} server connections of share {SHARE} "
        f"over {len(samples)} samples, {sum(errors.values())} failed workers"
    )


if __name__ == "__main__":
    run_async(main, F.scenario)
