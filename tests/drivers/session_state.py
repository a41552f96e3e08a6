"""Session state set by one client must follow that client across transactions and never reach another.

For each statement below, with asyncpg and with psycopg (autocommit): three "other" clients connect; client A
runs the statement, then checks in 5 separate transactions that it still sees its value, and after each of them
the other clients check that they see the defaults (the service has share 1, so they all use A's server).
Then A disconnects and 3 fresh clients check the defaults. Prepared statements are kept out of this scenario
(asyncpg statement_cache_size=0, psycopg prepare_threshold=None): the prepared-statement scenarios test those.
Each case starts on fresh server connections, so a leak in one case does not spoil the next.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DEFAULT_SEARCH_PATH,
    DIRECT_DSN,
    PROXY_DSN,
    Failures,
    describe,
    reset_servers_sync,
    run_async,
    sqlstate,
)

import asyncpg  # noqa: E402
import psycopg  # noqa: E402

F = Failures("session_state_does_not_leak")

# (case, statement client A runs, what A then checks, the value A must see)
CASES = [
    ("search_path", "SET search_path = leaked_by_a", "SELECT current_setting('search_path')", "leaked_by_a"),
    ("role", "SET ROLE app", "SELECT current_user::text", "app"),
    ("statement_timeout", "SET statement_timeout = '1ms'", "SELECT current_setting('statement_timeout')", "1ms"),
    (
        "standard_conforming_strings",
        "SET standard_conforming_strings = off",
        "SELECT current_setting('standard_conforming_strings')",
        "off",
    ),
    ("application_name", "SET application_name = 'leak'", "SELECT current_setting('application_name')", "leak"),
    ("work_mem", "SELECT set_config('work_mem', '77MB', false)", "SELECT current_setting('work_mem')", "77MB"),
]
DEFAULTS_Q = (
    "SELECT current_setting('search_path'), current_user::text, current_setting('statement_timeout'), "
    "current_setting('standard_conforming_strings'), current_setting('application_name'), "
    "current_setting('work_mem')"
)
DEFAULT_NAMES = ("search_path", "current_user", "statement_timeout", "standard_conforming_strings",
                 "application_name", "work_mem")
# application_name: what a fresh client sees before any case ran (the proxy's own label, or the client's
# empty name if the proxy forwards that); PROXY_APPLICATION_NAME pins it. Never 'leak'.
DEFAULTS = None


def defaults_with(app_name):
    return (DEFAULT_SEARCH_PATH, "postgres", "0", "on", app_name, "4MB")
checks = 0


class CaseFailed(Exception):
    pass


class Asyncpg:
    name = "asyncpg"

    async def connect(self):
        return await asyncpg.connect(PROXY_DSN, statement_cache_size=0, command_timeout=15)

    async def run(self, c, sql):
        await c.execute(sql)

    async def one(self, c, sql):
        return tuple(await c.fetchrow(sql))

    async def tx(self, c, sql):
        async with c.transaction():
            return tuple(await c.fetchrow(sql))

    async def close(self, c):
        await c.close()


class Psycopg:
    name = "psycopg"

    async def connect(self):
        return await psycopg.AsyncConnection.connect(PROXY_DSN, autocommit=True, prepare_threshold=None,
                                                     connect_timeout=10)

    async def run(self, c, sql):
        await c.execute(sql)

    async def one(self, c, sql):
        cur = await c.execute(sql)
        return tuple(await cur.fetchone())

    async def tx(self, c, sql):
        async with c.transaction():
            cur = await c.execute(sql)
            return tuple(await cur.fetchone())

    async def close(self, c):
        await c.close()


def diff_defaults(got):
    return ", ".join(f"{n} = {g!r} (want {w!r})" for n, g, w in zip(DEFAULT_NAMES, got, DEFAULTS) if g != w)


async def expect_defaults(d, c, where):
    global checks
    checks += 1
    try:
        got = await d.one(c, DEFAULTS_Q)
    except Exception as e:  # noqa: BLE001
        F.add(where, f"defaults query failed: {describe(e)}")
        raise CaseFailed from e
    if got != DEFAULTS:
        F.add(where, f"sees another client's state: {diff_defaults(got)}")
        raise CaseFailed


async def run_case(d, case, stmt, check_q, want):
    global checks
    tag = f"{d.name}/{case}"
    others = [await d.connect() for _ in range(3)]
    a = await d.connect()
    try:
        await expect_defaults(d, a, f"{tag}: client A before its statement")
        try:
            await d.run(a, stmt)
        except Exception as e:  # noqa: BLE001
            F.add(tag, f"client A's {stmt!r} failed: {describe(e)}")
            raise CaseFailed from e
        for t in range(5):
            checks += 1
            try:
                got = (await d.tx(a, check_q))[0]
            except Exception as e:  # noqa: BLE001
                # A statement_timeout of 1 ms may cancel A's own check: that, too, shows the setting applies to A.
                if case == "statement_timeout" and sqlstate(e) == "57014":
                    got = want
                else:
                    F.add(tag, f"client A's check in transaction {t + 1} failed: {describe(e)}")
                    raise CaseFailed from e
            if got != want:
                F.add(tag, f"client A lost its own setting in transaction {t + 1}: {check_q} = {got!r}, want {want!r}")
                raise CaseFailed
            for k, o in enumerate(others):
                await expect_defaults(d, o, f"{tag}: other client {k + 1} after A's transaction {t + 1}")
    finally:
        await d.close(a)
    await asyncio.sleep(0.05)
    for k in range(3):
        f = await d.connect()
        try:
            await expect_defaults(d, f, f"{tag}: fresh client {k + 1} after A left")
        finally:
            await d.close(f)
    for o in others:
        await d.close(o)


async def baseline_app_name():
    async with await psycopg.AsyncConnection.connect(PROXY_DSN, autocommit=True, prepare_threshold=None) as c:
        cur = await c.execute("SELECT current_setting('application_name')")
        return (await cur.fetchone())[0]


async def main():
    global DEFAULTS
    app_name = os.environ.get("PROXY_APPLICATION_NAME") or await baseline_app_name()
    if app_name == "leak":
        F.add("baseline", "a fresh client's application_name is already 'leak'")
    DEFAULTS = defaults_with(app_name)
    with psycopg.connect(DIRECT_DSN, autocommit=True) as c:
        c.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN CREATE ROLE app; END IF; END $$"
        )
        c.execute("GRANT app TO postgres")
    t0 = time.monotonic()
    cases = failed = 0
    for d in (Asyncpg(), Psycopg()):
        for case, stmt, check_q, want in CASES:
            cases += 1
            try:
                await run_case(d, case, stmt, check_q, want)
            except CaseFailed:
                failed += 1
            except Exception as e:  # noqa: BLE001
                failed += 1
                F.add(f"{d.name}/{case}", f"unexpected {describe(e)}")
            await asyncio.get_running_loop().run_in_executor(None, reset_servers_sync)
    return F.done(
        f"{cases} cases (6 statements x asyncpg, psycopg), {failed} failed, {checks} checks in "
        f"{time.monotonic() - t0:.1f} s; default application_name {app_name!r}"
    )


if __name__ == "__main__":
    run_async(main, F.scenario)
