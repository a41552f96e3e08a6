"""Session features pin the client's server in transaction mode (`pin = "allow"`, the default).

The service has share 1 and a short checkout_timeout. In each sub-case client A creates session state (LISTEN,
a temp table, a session advisory lock, an SQL prepared statement, a WITH HOLD cursor); while A holds it, client B
cannot get the server (ERROR 53300, the checkout timeout: ProxyError::BudgetExhausted in src/error.rs), and A
still has its state in later transactions. After A drops the state, B gets the server. Transaction-scoped
state (CREATE TEMP TABLE ... ON COMMIT DROP, pg_advisory_xact_lock) must not pin. A is asyncpg for LISTEN
(add_listener) and psycopg elsewhere; B is psycopg. Named prepared statements are kept out (asyncpg
statement_cache_size=0, psycopg prepare_threshold=None). Every sub-case starts on fresh server connections.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CHECKOUT_TIMEOUT, DIRECT_DSN, PROXY_DSN, Failures, describe, reset_servers_sync, run_async  # noqa: E402

import asyncpg  # noqa: E402
import psycopg  # noqa: E402

F = Failures("pinning_allow")
TOO_MANY_CONNECTIONS = "53300"  # what a checkout that times out answers (src/error.rs, BudgetExhausted)
blocked_waits = []


async def pg_connect(dsn=PROXY_DSN):
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10)


async def value(conn, sql):
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    return row[0] if row else None


async def direct_value(sql):
    async with await pg_connect(DIRECT_DSN) as c:
        return await value(c, sql)


async def b_blocked(b, where):
    """B must not get a server: 53300 after the checkout timeout."""
    t = time.monotonic()
    try:
        await b.execute("SELECT 1")
    except psycopg.Error as e:
        el = time.monotonic() - t
        blocked_waits.append(el)
        F.check(
            e.sqlstate == TOO_MANY_CONNECTIONS,
            where,
            f"B's query failed with {describe(e)} after {el:.2f} s, want SQLSTATE {TOO_MANY_CONNECTIONS}",
        )
        F.check(
            el >= CHECKOUT_TIMEOUT * 0.8,
            where,
            f"B was refused after {el:.2f} s, before the checkout_timeout of {CHECKOUT_TIMEOUT} s",
        )
        return
    F.add(
        where,
        f"B got a server after {time.monotonic() - t:.2f} s while A should hold it pinned "
        f"(want SQLSTATE {TOO_MANY_CONNECTIONS} after the checkout_timeout of {CHECKOUT_TIMEOUT} s)",
    )


async def b_ok(b, where):
    """B must get a server now."""
    t = time.monotonic()
    try:
        got = await value(b, "SELECT 1")
        F.check(got == 1, where, f"B's SELECT 1 returned {got!r}")
    except psycopg.Error as e:
        F.add(where, f"B still cannot get a server: {describe(e)} after {time.monotonic() - t:.2f} s")


async def expect_value(conn, sql, want, where, tx=False):
    try:
        if tx:
            async with conn.transaction():
                got = await value(conn, sql)
        else:
            got = await value(conn, sql)
    except psycopg.Error as e:
        F.add(where, f"A's {sql!r} failed: {describe(e)}")
        return
    F.check(got == want, where, f"A's {sql!r} returned {got!r}, want {want!r}")


async def case_listen(b):
    tag = "LISTEN"
    a = await asyncpg.connect(PROXY_DSN, statement_cache_size=0, command_timeout=15)
    got = []
    arrived = asyncio.Event()

    def on_notify(_conn, _pid, _channel, payload):
        got.append(payload)
        arrived.set()

    async def wait_for(payload):
        deadline = time.monotonic() + 2
        while payload not in got and time.monotonic() < deadline:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                pass
        return payload in got

    try:
        await a.add_listener("chan", on_notify)  # LISTEN "chan"
        await b_blocked(b, f"{tag}: while A listens")
        await a.execute("NOTIFY chan, 'self-1'")
        async with a.transaction():
            await a.execute("SELECT 1")
        async with a.transaction():
            await a.execute("SELECT pg_notify('chan', 'self-2')")
        for p in ("self-1", "self-2"):
            F.check(await wait_for(p), tag, f"A did not receive its own NOTIFY {p!r} (received {got})")
        async with await pg_connect(DIRECT_DSN) as d:
            await d.execute("NOTIFY chan, 'other-1'")
        F.check(await wait_for("other-1"), tag, f"A did not receive another session's NOTIFY (received {got})")
        await a.execute("UNLISTEN *")
        await b_ok(b, f"{tag}: after A's UNLISTEN *")
    finally:
        await a.close()


async def case_temp(b, unpin):
    tag = f"temp table / {unpin.split(' pin_tt')[0]}"
    a = await pg_connect()
    try:
        await a.execute("CREATE TEMP TABLE pin_tt(x int)")
        await a.execute("INSERT INTO pin_tt VALUES (1), (2)")
        await b_blocked(b, f"{tag}: while A has a temp table")
        await expect_value(a, "SELECT count(*) FROM pin_tt", 2, f"{tag}: A's temp table in a later transaction", tx=True)
        await a.execute(unpin)
        await b_ok(b, f"{tag}: after A's {unpin}")
    finally:
        await a.close()


async def case_advisory(b):
    tag = "session advisory lock"
    locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    a = await pg_connect()
    try:
        await a.execute("SELECT pg_advisory_lock(1)")
        await b_blocked(b, f"{tag}: while A holds pg_advisory_lock(1)")
        F.check(await direct_value(locks) == 1, tag, "the advisory lock is not held on the server")
        await expect_value(
            a,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            1,
            f"{tag}: A's lock seen from a later transaction",
            tx=True,
        )
        await a.execute("SELECT pg_advisory_unlock_all()")
        await b_ok(b, f"{tag}: after A's pg_advisory_unlock_all()")
        F.check(await direct_value(locks) == 0, tag, "an advisory lock is still held after pg_advisory_unlock_all()")
    finally:
        await a.close()


async def case_prepare(b):
    tag = "SQL PREPARE"
    a = await pg_connect()
    try:
        await a.execute("PREPARE p(int) AS SELECT $1 + 1")
        await b_blocked(b, f"{tag}: while A has prepared statement p")
        await expect_value(a, "EXECUTE p(41)", 42, f"{tag}: EXECUTE p in a later transaction", tx=True)
        await expect_value(a, "EXECUTE p(1)", 2, f"{tag}: EXECUTE p again")
        await a.execute("DEALLOCATE ALL")
        await b_ok(b, f"{tag}: after A's DEALLOCATE ALL")
    finally:
        await a.close()


async def case_cursor(b):
    tag = "WITH HOLD cursor"
    a = await pg_connect()
    try:
        await a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) AS g")
        await b_blocked(b, f"{tag}: while A has cursor c open")
        await expect_value(a, "FETCH NEXT FROM c", 1, f"{tag}: FETCH in a later statement")
        await expect_value(a, "FETCH NEXT FROM c", 2, f"{tag}: FETCH in a later transaction", tx=True)
        await a.execute("CLOSE c")
        await b_ok(b, f"{tag}: after A's CLOSE c")
    finally:
        await a.close()


async def case_no_pin(b):
    tag = "no pin"
    a = await pg_connect()
    try:
        async with a.transaction():
            await a.execute("CREATE TEMP TABLE t2(x int) ON COMMIT DROP")
            await a.execute("INSERT INTO t2 VALUES (1)")
            got = await value(a, "SELECT count(*) FROM t2")
        F.check(got == 1, tag, f"count(*) from t2 inside A's transaction = {got!r}")
        await b_ok(b, f"{tag}: right after A's transaction with CREATE TEMP TABLE t2 ... ON COMMIT DROP")
        async with a.transaction():
            await a.execute("SELECT pg_advisory_xact_lock(1)")
        await b_ok(b, f"{tag}: right after A's transaction with pg_advisory_xact_lock(1)")
        await expect_value(a, "SELECT 7", 7, f"{tag}: A goes on")
    finally:
        await a.close()


CASES = [
    ("LISTEN", case_listen),
    ("temp table / DISCARD TEMP", lambda b: case_temp(b, "DISCARD TEMP")),
    ("temp table / DROP TABLE", lambda b: case_temp(b, "DROP TABLE pin_tt")),
    ("session advisory lock", case_advisory),
    ("SQL PREPARE", case_prepare),
    ("WITH HOLD cursor", case_cursor),
    ("no pin", case_no_pin),
]


async def main():
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    failed_cases = []
    for name, case in CASES:
        before = len(F.items)
        b = await pg_connect()
        try:
            await b_ok(b, f"{name}: baseline, before A connects")
            await case(b)
        except Exception as e:  # noqa: BLE001
            F.add(name, f"unexpected {describe(e)}")
        finally:
            await b.close()
        if len(F.items) > before:
            failed_cases.append(name)
        await loop.run_in_executor(None, reset_servers_sync)
    waits = ", ".join(f"{w:.2f}" for w in blocked_waits) or "none"
    return F.done(
        f"{len(CASES)} sub-cases, failed: {failed_cases or 'none'}; B refused after [{waits}] s "
        f"(checkout_timeout {CHECKOUT_TIMEOUT} s); {time.monotonic() - t0:.1f} s"
    )


if __name__ == "__main__":
    run_async(main, F.scenario)
