"""Driver-level fidelity checks run by tests/fidelity.rs and tests/fidelity_session.rs: each SCENARIO runs the same steps through pgbudget
(PROXY_DSN) and directly (DIRECT_DSN) and fails naming every figure that differs or is wrong.

- session: asyncpg get_server_pid() == pg_backend_pid(), the pid of a self-notification == get_server_pid();
  psycopg (libpq PQbackendPID) info.backend_pid == pg_backend_pid().
- txn: asyncpg (default statement cache) fetches `select * from t` before and after a column type change and a
  column addition (asyncpg re-prepares after InvalidCachedStatementError itself); inside a transaction it
  cannot, and raises the same error as direct.
- notify (transaction mode): a listener gets notifications whose pid is the sender's get_server_pid() (another
  client's, and its own), also while other clients churn through the share.
- reshape (transaction mode, several servers): a prepared statement whose table changed type, bound on whichever
  server the client gets next, raises InvalidCachedStatementError as direct (never rows of the new shape decoded
  with the old one), and the next fetch after asyncpg re-prepares returns the new row.
- named (transaction mode, share 1): asyncpg's explicitly named statement run by SQL `EXECUTE`, and
  pg_prepared_statements as a statement_cache_size=0 client sees it after another client prepared and left.
- deallocate (transaction mode, share 2): psycopg 3 preparing every statement (prepare_threshold 0) with room
  for two (prepared_max 2) evicts the oldest by SQL `DEALLOCATE _pg3_N` as it goes; asyncpg deallocates its
  explicitly named statement by SQL and then gets the same 26000 as direct when it runs it.
- startup: psycopg with PGDATESTYLE and options=-c intervalstyle: the ParameterStatus values the driver got
  at login and what SHOW says.
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DIRECT_DSN, PROXY_DSN, Failures, describe, run_async  # noqa: E402

import asyncpg  # noqa: E402
import psycopg  # noqa: E402

SCENARIO = os.environ.get("SCENARIO", "")
F = Failures(f"fidelity_{SCENARIO}")


async def session_pids(dsn, where):
    conn = await asyncpg.connect(dsn)
    try:
        pid = conn.get_server_pid()
        backend = await conn.fetchval("select pg_backend_pid()")
        F.check(pid == backend, where, f"asyncpg get_server_pid() {pid} != pg_backend_pid() {backend}")
        got = asyncio.get_running_loop().create_future()
        await conn.add_listener("fid_ch", lambda c, p, ch, payload: got.done() or got.set_result((p, payload)))
        await conn.execute("notify fid_ch, 'hello'")
        npid, payload = await asyncio.wait_for(got, 5)
        F.check((npid, payload) == (pid, "hello"), where, f"notification {(npid, payload)} != {(pid, 'hello')}")
    finally:
        await conn.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        backend = c.execute("select pg_backend_pid()").fetchone()[0]
        F.check(c.info.backend_pid == backend, where, f"psycopg backend_pid {c.info.backend_pid} != {backend}")
    return pid


async def cached_statement(dsn, table, where):
    """Outcomes of fetches around DDL done on another (direct) connection."""
    admin = await asyncpg.connect(DIRECT_DSN)
    conn = await asyncpg.connect(dsn)
    out = []

    async def fetch(tx=False):
        try:
            if tx:
                async with conn.transaction():
                    rows = await conn.fetch(f"select * from {table}")
            else:
                rows = await conn.fetch(f"select * from {table}")
            out.append([tuple(r) for r in rows])
        except Exception as e:  # noqa: BLE001
            out.append(describe(e))

    try:
        await admin.execute(f"drop table if exists {table}; create table {table}(id int, v int)")
        await admin.execute(f"insert into {table} values (1, 10)")
        await fetch()
        await admin.execute(f"alter table {table} alter column v type text using v::text")
        await fetch()
        await admin.execute(f"alter table {table} add column w int default 7")
        await fetch()
        await fetch()
        await admin.execute(f"alter table {table} alter column w type bigint")
        await fetch(tx=True)
        await fetch(tx=True)
    finally:
        await conn.close()
        await admin.close()
    print(f"{where}: {out}")
    return out


def startup(dsn, datestyle, where):
    os.environ["PGDATESTYLE"] = datestyle
    try:
        with psycopg.connect(dsn, autocommit=True, options="-c intervalstyle=iso_8601") as c:
            ps = {k: c.info.parameter_status(k) for k in ("DateStyle", "IntervalStyle")}
            ps = {k: v.decode() if isinstance(v, bytes) else v for k, v in ps.items()}
            shown = c.execute(
                "select current_setting('datestyle'), current_setting('intervalstyle'), "
                "date '2024-03-05'::text, interval '1 day 2 hours'::text"
            ).fetchone()
            return {"parameter_status": ps, "show": list(shown)}
    finally:
        del os.environ["PGDATESTYLE"]


async def notify_pids(dsn, where):
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    others = [await asyncpg.connect(dsn) for _ in range(3)]
    got = asyncio.Queue()
    try:
        await listener.add_listener("fid_n", lambda c, p, ch, payload: got.put_nowait((p, payload)))
        # At once after LISTEN: it may arrive while the proxy still reads the listener's server.
        await sender.execute("notify fid_n, 'at-once'")
        pid, payload = await asyncio.wait_for(got.get(), 5)
        F.check((pid, payload) == (sender.get_server_pid(), "at-once"), where,
                f"notification {(pid, payload)} != {(sender.get_server_pid(), 'at-once')}")
        for i in range(5):
            # Other clients take servers in between, so the sender's server changes hands.
            await asyncio.gather(*(o.fetchval("select 1") for o in others))
            await sender.execute(f"notify fid_n, 'from-sender-{i}'")
            pid, payload = await asyncio.wait_for(got.get(), 5)
            F.check((pid, payload) == (sender.get_server_pid(), f"from-sender-{i}"), where,
                    f"notification {(pid, payload)} != {(sender.get_server_pid(), f'from-sender-{i}')}")
        await listener.execute("notify fid_n, 'self'")
        pid, payload = await asyncio.wait_for(got.get(), 5)
        F.check((pid, payload) == (listener.get_server_pid(), "self"), where,
                f"self notification {(pid, payload)} != {(listener.get_server_pid(), 'self')}")
    finally:
        for c in [listener, sender, *others]:
            await c.close()


async def reshape(dsn, where, table):
    admin = await asyncpg.connect(DIRECT_DSN)
    others = [await asyncpg.connect(dsn) for _ in range(4)]
    c = await asyncpg.connect(dsn)
    outcomes = []
    try:
        # Several servers in the pool, so the Bind after the change may land on one that lacks the statement.
        await asyncio.gather(*(o.execute("select pg_sleep(0.2)") for o in others))
        # One round: a second one (drop, create, alter again) can meet a server still holding the statement
        # planned for an older table of the same result type (see README, Transaction pooling, Limits).
        for i in range(1):
            await admin.execute(f"drop table if exists {table}; create table {table}(a int, b int); "
                                f"insert into {table} values (1, 2)")
            stmt = await c.prepare(f"select * from {table}")
            # The change comes from the same client (asyncpg's prepare leaves its batch open until then).
            await c.execute(f"alter table {table} alter column b set data type text")
            busy = asyncio.ensure_future(others[i % 4].execute("select pg_sleep(0.2)"))
            await asyncio.sleep(0.05)
            try:
                outcomes.append(("row", tuple(await stmt.fetchrow())))
            except asyncpg.exceptions.InvalidCachedStatementError:
                outcomes.append(("InvalidCachedStatementError",))
            except Exception as e:  # noqa: BLE001
                outcomes.append((type(e).__name__, str(e)[:80]))
            await busy
            outcomes.append(("again", tuple(await c.fetchrow(f"select * from {table}"))))
        await admin.execute(f"drop table {table}")
    finally:
        for x in [c, admin, *others]:
            await x.close()
    return outcomes


async def named(dsn, where):
    """(EXECUTE of a protocol-level name, prepared statements a fresh client sees after another left)."""
    conn = await asyncpg.connect(dsn)
    try:
        ps = await conn.prepare("select 1", name="foobar")
        F.check(ps.get_name() == "foobar", where, f"statement name {ps.get_name()!r}")
        executed = await conn.fetchval("EXECUTE foobar")
    finally:
        await conn.close()
    other = await asyncpg.connect(dsn)
    await other.fetchval("select $1::int + 1", 1)
    await other.close()
    fresh = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        left = await fresh.fetchval("select count(*) from pg_prepared_statements")
    finally:
        await fresh.close()
    return executed, left


async def deallocate(dsn, where):
    """(psycopg 3 results across evictions, asyncpg DEALLOCATE status, the SQLSTATE of running it after)."""
    results = []
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=0, autocommit=True) as conn:
        conn.prepared_max = 2
        for rnd in range(3):
            for i in range(5):
                cur = await conn.execute(f"select {i}::int + %s::int", (rnd,))
                results.append((await cur.fetchone())[0])
    conn = await asyncpg.connect(dsn)
    try:
        ps = await conn.prepare("select 41 + 1", name="to_go")
        F.check(await ps.fetchval() == 42, where, "the named statement runs before DEALLOCATE")
        status = await conn.execute("DEALLOCATE to_go")
        try:
            await ps.fetchval()
            after = "no error"
        except asyncpg.PostgresError as e:
            after = e.sqlstate
    finally:
        await conn.close()
    return results, status, after


async def main():
    if SCENARIO == "session":
        await session_pids(DIRECT_DSN, "direct")
        pid = await session_pids(PROXY_DSN, "proxy")
        summary = f"proxy pid {pid}"
    elif SCENARIO == "txn":
        direct = await cached_statement(DIRECT_DSN, "fid_direct", "direct")
        proxy = await cached_statement(PROXY_DSN, "fid_proxy", "proxy")
        for i, (d, p) in enumerate(zip(direct, proxy)):
            F.check(d == p, f"fetch {i}", f"proxy {p!r} != direct {d!r}")
        summary = f"{len(proxy)} fetches"
    elif SCENARIO == "notify":
        await notify_pids(DIRECT_DSN, "direct")
        await notify_pids(PROXY_DSN, "proxy")
        summary = "6 notifications each way"
    elif SCENARIO == "reshape":
        d = await reshape(DIRECT_DSN, "direct", "fid_rs_d")
        p = await reshape(PROXY_DSN, "proxy", "fid_rs_p")
        for i, (x, y) in enumerate(zip(d, p)):
            F.check(x == y, f"step {i}", f"proxy {y!r} != direct {x!r}")
        summary = f"{len(p)} steps"
    elif SCENARIO == "named":
        d, p = await named(DIRECT_DSN, "direct"), await named(PROXY_DSN, "proxy")
        F.check(d == (1, 0), "direct", f"(EXECUTE result, statements left) {d!r}")
        F.check(p == d, "proxy", f"(EXECUTE result, statements left) {p!r} != direct {d!r}")
        summary = f"proxy {p!r}"
    elif SCENARIO == "deallocate":
        d, p = await deallocate(DIRECT_DSN, "direct"), await deallocate(PROXY_DSN, "proxy")
        F.check(d[1:] == ("DEALLOCATE", "26000"), "direct", f"(status, after) {d[1:]!r}")
        F.check(p == d, "proxy", f"{p!r} != direct {d!r}")
        summary = f"proxy {p[1:]!r}, {len(p[0])} results"
    elif SCENARIO == "startup":
        for ds in ("Postgres, MDY", "German"):
            d, p = startup(DIRECT_DSN, ds, "direct"), startup(PROXY_DSN, ds, "proxy")
            print(f"PGDATESTYLE={ds!r}: direct {d} proxy {p}")
            for k in d:
                F.check(d[k] == p[k], f"PGDATESTYLE={ds!r} {k}", f"proxy {p[k]!r} != direct {d[k]!r}")
        summary = "2 datestyles"
    else:
        sys.exit(f"unknown SCENARIO {SCENARIO!r}")
    return F.done(summary)


run_async(main, f"fidelity_{SCENARIO}")
