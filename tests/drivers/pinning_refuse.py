"""`pin = "refuse"`: session features that would pin a server fail instead, and leave nothing behind.

Share 1, so every statement of every client runs on the same server and leftovers would be visible. For each
statement: it fails with SQLSTATE 0A000 and a message that mentions pinning; the connection stays usable (the
next query works); the state was not created on the server; and another client gets the server at once (it is
not pinned). Transaction-scoped state (ON COMMIT DROP temp table, pg_advisory_xact_lock) is still allowed.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CHECKOUT_TIMEOUT, DIRECT_DSN, PROXY_DSN, Failures, describe, reset_servers_sync, run_async  # noqa: E402

import psycopg  # noqa: E402

F = Failures("pinning_refuse")
FEATURE_NOT_SUPPORTED = "0A000"

# (statement, query through the client that must return 0 afterwards, or None; same through DIRECT_DSN)
CASES = [
    ("LISTEN chan", "SELECT count(*) FROM pg_listening_channels()", None),
    (
        "CREATE TEMP TABLE rt(x int)",
        None,
        "SELECT count(*) FROM pg_class WHERE relname = 'rt' AND relpersistence = 't'",
    ),
    ("SELECT pg_advisory_lock(1)", None, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
    ("PREPARE p AS SELECT 1", "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'", None),
    (
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT count(*) FROM pg_cursors WHERE name = 'c'",
        None,
    ),
]


async def connect(dsn=PROXY_DSN):
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10)


async def value(conn, sql):
    cur = await conn.execute(sql)
    return (await cur.fetchone())[0]


async def run_case(stmt, via_client, via_direct, b):
    a = await connect()
    try:
        try:
            await a.execute(stmt)
            F.add(stmt, "succeeded, want SQLSTATE 0A000 (pin = \"refuse\")")
        except psycopg.Error as e:
            msg = (e.diag.message_primary or str(e)) if e.diag else str(e)
            F.check(e.sqlstate == FEATURE_NOT_SUPPORTED, stmt, f"failed with {describe(e)}, want SQLSTATE 0A000")
            F.check("pin" in msg.lower(), stmt, f"the error message does not mention pinning: {msg!r}")
        try:
            F.check(await value(a, "SELECT 1") == 1, stmt, "the next query returned a wrong result")
        except psycopg.Error as e:
            F.add(stmt, f"the connection is not usable after the refusal: {describe(e)}")
            return
        if via_client:
            n = await value(a, via_client)
            F.check(n == 0, stmt, f"the refused state exists on the server anyway: {via_client} = {n}")
        if via_direct:
            async with await connect(DIRECT_DSN) as d:
                n = await value(d, via_direct)
            F.check(n == 0, stmt, f"the refused state exists on the server anyway: {via_direct} = {n}")
        t = time.monotonic()
        try:
            F.check(await value(b, "SELECT 2") == 2, stmt, "another client's query returned a wrong result")
        except psycopg.Error as e:
            F.add(stmt, f"another client cannot get the server after the refusal ({describe(e)} after "
                        f"{time.monotonic() - t:.2f} s; checkout_timeout {CHECKOUT_TIMEOUT} s): it is pinned")
    finally:
        await a.close()


async def allowed(b):
    tag = "transaction-scoped state"
    a = await connect()
    try:
        async with a.transaction():
            await a.execute("CREATE TEMP TABLE t2(x int) ON COMMIT DROP")
            await a.execute("INSERT INTO t2 VALUES (1)")
            F.check(await value(a, "SELECT count(*) FROM t2") == 1, tag, "t2 inside the transaction")
        async with a.transaction():
            await a.execute("SELECT pg_advisory_xact_lock(1)")
        F.check(await value(b, "SELECT 3") == 3, tag, "another client's query returned a wrong result")
    except psycopg.Error as e:
        F.add(tag, f"refused or failed: {describe(e)}")
    finally:
        await a.close()


async def main():
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    for stmt, via_client, via_direct in CASES:
        b = await connect()
        try:
            await run_case(stmt, via_client, via_direct, b)
        except Exception as e:  # noqa: BLE001
            F.add(stmt, f"unexpected {describe(e)}")
        finally:
            await b.close()
        await loop.run_in_executor(None, reset_servers_sync)
    b = await connect()
    try:
        await allowed(b)
    finally:
        await b.close()
    return F.done(f"{len(CASES)} refused statements + transaction-scoped state, {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    run_async(main, F.scenario)
