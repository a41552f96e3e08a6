"""Shared helpers of the driver scenarios (run by tests/drivers.rs, see there).

Every scenario reads PROXY_DSN (pgbudget) and DIRECT_DSN (Postgres itself) as postgres:// URLs, prints one
summary line of figures on success and exits 1 naming every failed check otherwise.
"""

import os
import sys
import time

DEFAULT_SEARCH_PATH = '"$user", public'


def dsn(name):
    v = os.environ.get(name)
    if not v:
        sys.exit(f"{name} is not set (a postgres:// URL); this script is run by tests/drivers.rs")
    return v


PROXY_DSN = dsn("PROXY_DSN")
DIRECT_DSN = dsn("DIRECT_DSN")
# The checkout_timeout of the service under test (a blocked checkout fails after it).
CHECKOUT_TIMEOUT = float(os.environ.get("CHECKOUT_TIMEOUT_S", "1"))


class Failures:
    """Collects failed checks; `done()` prints them (or the summary) and returns the exit code."""

    def __init__(self, scenario):
        self.scenario = scenario
        self.items = []

    def add(self, where, msg):
        line = f"FAIL [{where}] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.items.append(line)

    def check(self, cond, where, msg):
        if not cond:
            self.add(where, msg)
        return bool(cond)

    def done(self, summary):
        if self.items:
            print(f"{self.scenario}: {len(self.items)} failed check(s):", file=sys.stderr)
            for i in self.items:
                print("  " + i, file=sys.stderr)
            print(f"{self.scenario}: FAILED ({summary})")
            return 1
        print(f"{self.scenario}: ok ({summary})")
        return 0


def describe(e):
    """`ClassName SQLSTATE: message` for any driver's exception."""
    code = getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate", None)
    return f"{type(e).__name__} {code or '-'}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def error_kind(e):
    """`describe(e)` with per-connection statement names (asyncpg, psycopg, pgbench, node) folded, for counting."""
    import re

    return re.sub(r"(__asyncpg_stmt_|_pg3_|\bP_)[0-9a-f]+(__)?", r"\1N\2", describe(e))


def sqlstate(e):
    return getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate", None)


def reset_servers_sync():
    """Terminate every client backend but our own (i.e. the proxy's server connections) and wait until they
    are gone, so the next sub-case starts on fresh servers whatever the previous one left behind."""
    import psycopg

    with psycopg.connect(DIRECT_DSN, autocommit=True) as c:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            n = c.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()[0]
            if n == 0:
                break
            time.sleep(0.05)
    time.sleep(0.2)


def run_async(main, scenario):
    """Run `main()` (which returns the exit code) under the scenario's overall deadline; exit with its code."""
    import asyncio

    limit = float(os.environ.get("SCENARIO_TIMEOUT_S", "80"))
    try:
        code = asyncio.run(asyncio.wait_for(main(), limit))
    except asyncio.TimeoutError:
        print(f"{scenario}: FAILED (scenario did not finish within {limit:.0f} s)", file=sys.stderr)
        code = 1
    sys.exit(code)
