#!/usr/bin/env bash
# psycopg 3's own test suite, direct vs through pgbudget (transaction pooling).
#
# Runs the chosen modules of psycopg 3's upstream tests/ (PyPI `psycopg`, whose sdist ships no tests) twice:
# directly against a throwaway Postgres and through pgbudget in transaction mode (slice 20, ceiling 200,
# pin = "allow", [auth] passthrough, databases = ["*"]), each run on a fresh copy of the same cluster, and
# prints both runs' passed/failed/errored/skipped counts, the tests that fail only through pgbudget (with the
# first line of their error) and those failing only direct.
#
# The tests come from PSYCOPG_SRC, a directory holding upstream's tests/ tree (and its pyproject.toml, whose
# [tool.pytest.ini_options] the suite needs: asyncio_mode = "auto", filterwarnings = error). When it has no
# tests/ the script clones upstream's tag PSYCOPG_VERSION there (git clone --depth 1; needs github.com). The
# suite runs in a virtualenv of its own under CACHE (the system Python stays untouched) with
# psycopg[binary]==PSYCOPG_VERSION and the plugins its tests use: pytest 7 with pytest-asyncio 0.21 (the 3.1
# suite's async fixtures are plain @pytest.fixture coroutines, which need asyncio_mode = "auto"),
# pytest-timeout, and pproxy (the `proxy` fixture's tunnel).
# The suite is configured by PSYCOPG_TEST_DSN ("host=127.0.0.1 port=... user=postgres password=secret
# dbname=postgres"); the cluster has max_prepared_transactions = 10 (the tpc tests) and hstore in database
# postgres. Upstream code is read from PSYCOPG_SRC only: nothing of it is copied into this repository.
#
# Exit status: 0 when no test fails only through pgbudget, 1 otherwise (or when the pgbudget run did not
# complete), 2 when the harness itself fails.
#
# Knobs (environment): PSYCOPG_VERSION (3.1.4), CACHE (~/.cache/pgbudget/driver-suites), PSYCOPG_SRC
# ($CACHE/psycopg-$PSYCOPG_VERSION/src), VENV ($CACHE/psycopg-$PSYCOPG_VERSION/venv), PYTEST_ARGS (the test
# modules to run, relative to PSYCOPG_SRC; default: those of MODULES present in PSYCOPG_SRC), MODULES (the
# default module list below), TEST_TIMEOUT (per-test seconds, pytest-timeout, 60), RUN_TIMEOUT (seconds per
# run, 1200; SIGINT then, pytest still writes what ran), PYTHON (python3, to create the venv), PGBUDGET_BIN
# (skip the cargo build), PGBUDGET_LOG (RUST_LOG for pgbudget, "warn"), POOL_MODE, SLICE and PIN (the
# service's pool mode, "transaction", slice, 20, and pin, "allow"), OUT (target/psycopg-suite: logs,
# junit XML), KEEP_TMP=1 (keep the clusters and the pgbudget config).
set -euo pipefail

PSYCOPG_VERSION=${PSYCOPG_VERSION:-3.1.4}
CACHE=${CACHE:-$HOME/.cache/pgbudget/driver-suites}
PSYCOPG_SRC=${PSYCOPG_SRC:-$CACHE/psycopg-$PSYCOPG_VERSION/src}
VENV=${VENV:-$CACHE/psycopg-$PSYCOPG_VERSION/venv}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}
PYTHON=${PYTHON:-python3}
PASSWORD=secret
# connection, cursors (client-side, server-side, raw), prepared statements, pipeline, COPY, transactions,
# two-phase commit, errors, notifications, adaptation basics, sql composition, the libpq wrapper
MODULES=${MODULES:-"tests/test_connection.py tests/test_connection_async.py tests/test_conninfo.py
tests/test_cursor.py tests/test_cursor_async.py tests/test_client_cursor.py tests/test_client_cursor_async.py
tests/test_server_cursor.py tests/test_server_cursor_async.py tests/test_raw_cursor.py
tests/test_raw_cursor_async.py tests/test_prepared.py tests/test_prepared_async.py tests/test_pipeline.py
tests/test_pipeline_async.py tests/test_copy.py tests/test_copy_async.py tests/test_transaction.py
tests/test_transaction_async.py tests/test_tpc.py tests/test_tpc_async.py tests/test_errors.py
tests/test_notify.py tests/test_notify_async.py tests/test_concurrency.py tests/test_concurrency_async.py tests/test_adapt.py
tests/test_sql.py tests/test_query.py
tests/pq"}

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd -- "$REPO_ROOT"
OUT=${OUT:-target/psycopg-suite}
mkdir -p -- "$OUT" "$CACHE"
OUT=$(cd -- "$OUT" && pwd)

# shellcheck source-path=SCRIPTDIR source=suite_lib.sh
source "$SCRIPT_DIR/suite_lib.sh"

# ---------------------------------------------------------------- tools, the tests, the virtualenv
find_postgres
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

if [[ ! -d $PSYCOPG_SRC/tests ]]; then
    command -v git >/dev/null || die "no tests/ in PSYCOPG_SRC=$PSYCOPG_SRC and no git to clone them"
    log "cloning psycopg $PSYCOPG_VERSION into $PSYCOPG_SRC"
    rm -rf -- "$PSYCOPG_SRC.tmp"
    git clone -q --depth 1 --branch "$PSYCOPG_VERSION" https://github.com/psycopg/psycopg "$PSYCOPG_SRC.tmp" >&2 ||
        die "git clone of psycopg $PSYCOPG_VERSION failed (set PSYCOPG_SRC to a directory holding its tests/)"
    mkdir -p -- "$(dirname -- "$PSYCOPG_SRC")" && mv -- "$PSYCOPG_SRC.tmp" "$PSYCOPG_SRC"
fi
[[ -f $PSYCOPG_SRC/tests/conftest.py ]] || die "$PSYCOPG_SRC/tests/conftest.py missing"
[[ -f $PSYCOPG_SRC/pyproject.toml || -f $PSYCOPG_SRC/pytest.ini || -f $PSYCOPG_SRC/setup.cfg ]] ||
    log "warning: no pyproject.toml / pytest.ini in $PSYCOPG_SRC: upstream's pytest options (asyncio_mode) are missing"

VPY=$VENV/bin/python
want=("psycopg[binary]==$PSYCOPG_VERSION" "pytest==7.4.4" "pytest-asyncio==0.21.2" "pytest-timeout" "pproxy")
if [[ ! -x $VPY ]]; then
    log "creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV" >&2 || die "python -m venv $VENV failed"
fi
if ! "$VPY" - "$PSYCOPG_VERSION" <<'PY' 2>/dev/null; then
import sys, importlib.metadata as md
assert md.version("psycopg") == sys.argv[1] and md.version("psycopg-binary") == sys.argv[1]
assert md.version("pytest").startswith("7.") and md.version("pytest-asyncio") == "0.21.2"
for n in ("pytest-timeout", "pproxy"): md.version(n)
PY
    log "pip install ${want[*]} (into $VENV)"
    "$VPY" -m pip install -q --disable-pip-version-check "${want[@]}" >&2 || die "pip install failed"
fi
PATH=$VENV/bin:$PATH # the proxy fixture runs `pproxy`

if [[ -z ${PYTEST_ARGS:-} ]]; then
    PYTEST_ARGS=""
    for m in $MODULES; do [[ -e $PSYCOPG_SRC/$m ]] && PYTEST_ARGS+=" $m"; done
    [[ -n $PYTEST_ARGS ]] || die "none of the modules in MODULES exists under $PSYCOPG_SRC"
fi

build_pgbudget

# ---------------------------------------------------------------- processes
harness_init psycopg-suite INT # RUN_PID: pytest (SIGINT: it still writes its junit XML)
PG_EXTRA_OPTS=(-c max_prepared_transactions=10) # the tpc tests

# ---------------------------------------------------------------- the pristine cluster every run starts from
init_template
start_pg "$TMP/template" "$TMP/template.log"
# the hstore fixture creates the extension itself; creating it here keeps both runs' catalogs the same
psql_at "$PG_PORT" -d postgres -c 'CREATE EXTENSION hstore' || die "cannot create extension hstore (contrib)"
stop_pg

# ---------------------------------------------------------------- runs
run_suite() { # target port: one pytest run; junit XML, log and exit status into OUT
    local target=$1 port=$2 rc=0 base=$OUT/psycopg-$1
    local dsn="host=127.0.0.1 port=$port user=postgres password=$PASSWORD dbname=postgres"
    rm -f -- "$base.xml" "$base.rc"
    log "psycopg $PSYCOPG_VERSION via $target (127.0.0.1:$port): pytest, log $base.log"
    local t0=$SECONDS summary
    # In the background and waited for, so Ctrl-C / SIGTERM reach the trap (timeout runs in its own process
    # group); `exec` makes RUN_PID timeout's pid, which passes a signal on to pytest.
    # shellcheck disable=SC2086 # PYTEST_ARGS is a word list
    (cd "$PSYCOPG_SRC" && exec env -u PGHOST -u PGPORT -u PGUSER -u PGPASSWORD -u PGDATABASE -u PGSSLMODE \
        -u PGSERVICE -u PGOPTIONS -u PGPASSFILE -u PGSERVICEFILE -u PGAPPNAME -u PSYCOPG_IMPL \
        PSYCOPG_TEST_DSN="$dsn" timeout -s INT -k 60 "$RUN_TIMEOUT" "$VPY" -m pytest -p no:cacheprovider -q -rfE \
        --continue-on-collection-errors --timeout="$TEST_TIMEOUT" --junitxml="$base.xml" \
        --test-dsn "$dsn" $PYTEST_ARGS) >"$base.log" 2>&1 &
    RUN_PID=$!
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
    echo "$rc $(( SECONDS - t0 ))" >"$base.rc"
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)' "$base.log" | tail -n 1 || true)
    log "  ${summary:-no pytest summary line} (exit $rc, $(( SECONDS - t0 )) s)"
}

for target in direct pgbudget; do
    rm -rf -- "$TMP/pgdata" && cp -a -- "$TMP/template" "$TMP/pgdata" # same pristine cluster for each run
    start_pg "$TMP/pgdata" "$OUT/postgres-$target.log"
    port=$PG_PORT
    if [[ $target == pgbudget ]]; then
        start_pgbudget "$OUT/pgbudget.log"
        port=$PGBUDGET_PORT
        psql_at "$port" -d postgres -c 'select 1' >/dev/null || die "smoke query through pgbudget failed"
    fi
    run_suite "$target" "$port"
    if [[ -n $PGBUDGET_PID ]] && ! kill -0 "$PGBUDGET_PID" 2>/dev/null; then log "pgbudget died during the run!"; fi
    stop_pgbudget
    stop_pg
done
log "done, $SECONDS s in all; logs and junit XML in $OUT"

# ---------------------------------------------------------------- summary
"$VPY" - "$OUT" "$TEST_TIMEOUT" "$PSYCOPG_VERSION" "$SCRIPT_DIR" <<'PY'
import os, sys
out, test_timeout, version, here = sys.argv[1:5]
sys.path.insert(0, here)
from suite_junit import bad, counts, load as load_base
load = lambda target: load_base(os.path.join(out, f"psycopg-{target}"), whole_message=False)
(d, drc, dsec), (p, prc, psec) = load("direct"), load("pgbudget")
notes, proxy_fail = [], p is None
for name, rc, secs in (("direct", drc, dsec), ("pgbudget", prc, psec)):
    if rc not in ("0", "1"):
        notes.append(f"via {name}: pytest exit {rc} after {secs} s"
                     + (" (RUN_TIMEOUT hit: tests after that point did not run)" if rc == "124" else ""))
        proxy_fail |= name == "pgbudget"
ids = sorted(set(d or {}) | set(p or {}))
only_p = [t for t in ids if bad(p, t) and not bad(d, t)]
only_d = [t for t in ids if bad(d, t) and not bad(p, t)]
both = [t for t in ids if bad(d, t) and bad(p, t)]
# failing both ways, but not the same way: the pgbudget run may hide a difference behind a direct failure
# (an upstream test of another vintage than the installed driver fails direct before it reaches the server)
differ = [t for t in both if d[t][1].split(":")[0] != p[t][1].split(":")[0]]
proxy_fail |= bool(only_p)

print(f"\npsycopg {version}      pass/fail/err/skip   time")
print(f"  direct          {counts(d):20} {dsec} s")
print(f"  pgbudget        {counts(p):20} {psec} s")
for n in notes:
    print(f"note: {n}")
for title, items, res in (("fail only through pgbudget", only_p, p), ("fail only direct", only_d, d),
                          ("fail both ways", both, p),
                          ("fail both ways with another error through pgbudget (direct's error first)", differ, None)):
    if res is None:
        print(f"\n{len(items)} test(s) {title}", *(f"  {t}\n    direct:   {d[t][1]}\n    pgbudget: {p[t][1]}"
                                                  for t in items), sep="\n")
        continue
    print(f"\n{len(items)} test(s) {title}", *(f"  {res[t][0].upper():6} {t} - {res[t][1]}" for t in items), sep="\n")
print(f"\n(per-test timeout {test_timeout} s; logs, junit XML: {out})")
sys.exit(1 if proxy_fail else 0)
PY
