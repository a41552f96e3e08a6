#!/usr/bin/env bash
# Real drivers' own test suites, direct vs through pgbudget (transaction pooling).
#
# For every suite in SUITES, runs the driver's upstream tests twice: directly against a throwaway Postgres, and
# through pgbudget in transaction mode (slice 20, ceiling 200, pin = "allow", [auth] passthrough,
# databases = ["*"]), each run on a fresh copy of the same cluster. Prints per suite both runs'
# passed/failed/errored/skipped counts, the tests that fail only through pgbudget (with their one-line error:
# the message of pytest's -rfE summary, or a Rust test's panic message) and those failing only direct.
# Suites:
# - asyncpg: tests/ of its PyPI sdist, pytest, against the INSTALLED driver (its _testbase uses the running
#   server when PGHOST is set and skips the tests that need a cluster of its own);
# - psycopg2: tests/ of its sdist, pytest, with psycopg2-binary (configured by PSYCOPG2_TESTDB*);
# - pg8000: test/ of its sdist, pytest, against the installed pure-Python wheel (its conftests read PGHOST,
#   PGPORT, PGPASSWORD, user postgres; pytest-benchmark's benchmarks run once, --benchmark-disable). The cluster
#   gets what its CI sets up: hstore in database postgres, and pg_hba lines for the databases its auth tests
#   name (pg8000_md5 md5, pg8000_password password, pg8000_gss gss, pg8000_scram_sha_256 scram-sha-256). Its
#   *_ssl tests fail both ways (the cluster has no TLS); test/test_readme.py needs a README.md and a server on
#   localhost:5432 (upstream runs it apart), so it is left out;
# - tokio-postgres: the crate's tests/ (`cargo test --tests --all-features`, as upstream CI, libtest's default
#   --test-threads) from the cargo registry (~/.cargo/registry, else static.crates.io), built in a copy under
#   CACHE with its own CARGO_TARGET_DIR and the crate's Cargo.lock, so a second run compiles nothing. Its tests
#   hardcode 127.0.0.1:5433 / localhost:5433 and expect upstream's docker/sql_setup.sh (not in the crate): the
#   copy's port is rewritten to one port used by both runs (Postgres's direct, pgbudget's through; kept in
#   CACHE and reused while free, so the test binary stays the same), `user=postgres` gets `password=secret`
#   (upstream trusts postgres; here it logs in with SCRAM as everywhere), and the cluster gets sql_setup.sh's
#   roles pass_user / md5_user / scram_user (password "password", stored as SCRAM) behind pg_hba methods
#   password / md5 / scram-sha-256, and hstore, citext, ltree in database postgres (no TLS and no ssl_user: the
#   TLS tests live in postgres-openssl and postgres-native-tls). No per-test timeout: RUN_TIMEOUT stops the
#   run, and a test libtest reported running for over 60 s that never finished counts as an error.
# Exit status: 0 when no test fails only through pgbudget, 1 otherwise (or when a pgbudget run did not
# complete), 2 when the harness itself fails.
#
# Knobs (environment): SUITES ("asyncpg psycopg2 pg8000 tokio-postgres", any of them in any order),
# ASYNCPG_VERSION (0.32.0, must be the installed one), PSYCOPG2_VERSION (2.9.13), PG8000_VERSION (1.31.6),
# TOKIO_POSTGRES_VERSION (0.7.18), TEST_TIMEOUT (per-test seconds, pytest-timeout, 60), RUN_TIMEOUT (seconds
# per test run, 900; SIGINT then, pytest still writes what ran), PYTHON (python3), PGBUDGET_BIN (skip the
# cargo build), PGBUDGET_LOG (RUST_LOG for pgbudget, "warn"), CACHE (~/.cache/pgbudget/driver-suites: the
# sdists, the tokio-postgres crate and its build, so a second run needs no network), OUT
# (target/driver-suites: logs, junit XML), PYTEST_ARGS (what pytest runs, default "tests", for pg8000 "test";
# e.g. "tests/test_pool.py" or "-k pool tests": give SUITES one suite with it), CARGO_TEST_ARGS (libtest's
# arguments after `--` for tokio-postgres, e.g. "runtime::" or "--test-threads=1"), KEEP_TMP=1.
# Missing Python packages (pytest, pytest-timeout, distro, psycopg2-binary, pg8000, pytest-mock,
# pytest-benchmark, pytz) are installed with pip.
set -euo pipefail

SUITES=${SUITES:-"asyncpg psycopg2 pg8000 tokio-postgres"}
ASYNCPG_VERSION=${ASYNCPG_VERSION:-0.32.0}
PSYCOPG2_VERSION=${PSYCOPG2_VERSION:-2.9.13}
PG8000_VERSION=${PG8000_VERSION:-1.31.6}
TOKIO_POSTGRES_VERSION=${TOKIO_POSTGRES_VERSION:-0.7.18}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
PYTHON=${PYTHON:-python3}
CACHE=${CACHE:-$HOME/.cache/pgbudget/driver-suites}
PASSWORD=secret

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd -- "$REPO_ROOT"
OUT=${OUT:-target/driver-suites}
mkdir -p -- "$OUT" "$CACHE"
OUT=$(cd -- "$OUT" && pwd)

log() { printf '[driver_suites.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
ALL_SUITES="asyncpg psycopg2 pg8000 tokio-postgres"
for s in $SUITES; do [[ " $ALL_SUITES " == *" $s "* ]] || die "unknown suite '$s' ($ALL_SUITES)"; done
has_suite() { [[ " $SUITES " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools and Python packages
if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/postgres" ]]; then PGBIN=$(pg_config --bindir)
elif [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then PGBIN=/usr/lib/postgresql/15/bin
else die "cannot find the Postgres server binaries (pg_config --bindir, /usr/lib/postgresql/15/bin)"; fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
AS_PG=() # as root, Postgres runs as the unprivileged postgres user
if (( EUID == 0 )); then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run Postgres as"
    AS_PG=(runuser -u postgres --)
fi

pip_install() { # pip args...: Debian's system Python refuses plain installs (PEP 668); these are test-only
    local out
    if ! out=$("$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@" 2>&1); then
        grep -q externally-managed <<<"$out" || { echo "$out" >&2; die "pip install $* failed"; }
        "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --break-system-packages "$@" >&2
    fi
}
missing_pkgs() { # name==version...: prints those not installed at that version (psycopg2 counts as -binary)
    "$PYTHON" - "$@" <<'PY'
import sys, importlib.metadata as md
def version(name):
    for n in [name, "psycopg2"] if name == "psycopg2-binary" else [name]:
        try: return md.version(n)
        except md.PackageNotFoundError: pass
specs = [a.partition("==") for a in sys.argv[1:]]
print(" ".join(n + s + w for n, s, w in specs if version(n) is None or (w and version(n) != w)))
PY
}
want=(pytest pytest-timeout)
# asyncpg's tests/test_connect.py imports distro
has_suite asyncpg && want+=("asyncpg==$ASYNCPG_VERSION" distro)
has_suite psycopg2 && want+=("psycopg2-binary==$PSYCOPG2_VERSION")
# pg8000's tests use the mocker and benchmark fixtures and import pytz (its CI installs the same three)
has_suite pg8000 && want+=("pg8000==$PG8000_VERSION" pytest-mock pytest-benchmark pytz)
if has_suite tokio-postgres; then command -v cargo >/dev/null || die "the tokio-postgres suite needs cargo"; fi
read -r -a missing <<<"$(missing_pkgs "${want[@]}")"
if (( ${#missing[@]} )); then
    log "pip install ${missing[*]}"
    pip_install --only-binary asyncpg,psycopg2-binary,pg8000 "${missing[@]}"
    read -r -a missing <<<"$(missing_pkgs "${want[@]}")"
    (( ${#missing[@]} == 0 )) || die "still missing after pip install: ${missing[*]}"
fi

fetch_sdist() { # name version -> path of the cached sdist (pip download only when it is not cached)
    local f=$CACHE/$1-$2.tar.gz
    if [[ ! -s $f ]]; then # --no-binary for the driver only: the build deps of pip's metadata step may be wheels
        log "downloading the $1 $2 sdist into $CACHE"
        "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary "$1" -d "$CACHE" "$1==$2" >&2 ||
            die "pip download $1==$2 failed"
    fi
    [[ -s $f ]] || die "pip download did not produce $f"
    echo "$f"
}

fetch_crate() { # name version -> a directory holding the crate's pristine source
    local name=$1 v=$2 d f c
    for d in "$HOME"/.cargo/registry/src/*/"$name-$v"; do [[ -f $d/Cargo.toml ]] && { echo "$d"; return; }; done
    d=$CACHE/$name-$v/pristine f=$CACHE/$name-$v.crate
    if [[ ! -f $d/Cargo.toml ]]; then
        if [[ ! -s $f ]]; then
            rm -f -- "$f.part"
            for c in "$HOME"/.cargo/registry/cache/*/"$name-$v.crate"; do [[ -s $c ]] && cp -- "$c" "$f.part" && break; done
            if [[ ! -s $f.part ]]; then # where crates.io's download API redirects
                log "downloading the $name $v crate into $CACHE"
                curl -fsSL -o "$f.part" "https://static.crates.io/crates/$name/$name-$v.crate" ||
                    die "cannot download the $name $v crate"
            fi
            mv -- "$f.part" "$f"
        fi
        rm -rf -- "$d" && mkdir -p -- "$d"
        tar -xzf "$f" -C "$d" --strip-components=1 || die "cannot unpack $f"
    fi
    echo "$d"
}

if [[ -n ${PGBUDGET_BIN:-} ]]; then
    [[ -x $PGBUDGET_BIN ]] || die "PGBUDGET_BIN=$PGBUDGET_BIN is not executable"
else
    log "building pgbudget (cargo build --release --bin pgbudget)"
    cargo build --release --bin pgbudget >&2 || die "cargo build failed"
    PGBUDGET_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/pgbudget
fi

# ---------------------------------------------------------------- processes, cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/driver-suites.XXXXXX")
PG_PID="" PG_LAUNCHER="" PGBUDGET_PID="" PGDATA_DIR="" PYTEST_PID="" # PYTEST_PID: cargo test's timeout too

stop_pid() { # pid signal
    local pid=$1 sig=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for (( i = 0; i < 200; i++ )); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "pid $pid did not stop after SIG$sig within 20 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
stop_pgbudget() { stop_pid "$PGBUDGET_PID" TERM; PGBUDGET_PID=""; }
stop_pg() {
    if [[ -z $PG_PID && -n $PGDATA_DIR && -s $PGDATA_DIR/postmaster.pid ]]; then PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid"); fi
    stop_pid "$PG_PID" INT
    stop_pid "$PG_LAUNCHER" TERM # the runuser wrapper: normally gone already
    wait "$PG_LAUNCHER" 2>/dev/null || true
    PG_PID="" PG_LAUNCHER=""
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$PYTEST_PID" INT # pytest still writes its junit XML
    stop_pgbudget
    stop_pg
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "keeping $TMP"; else rm -rf -- "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT; trap 'exit 130' INT; trap 'exit 143' TERM
if (( EUID == 0 )); then chown postgres: "$TMP"; fi

free_port() { # [preferred]: a bindable loopback port below the ephemeral range, so no outgoing connection
    # takes it; the preferred one when that is bindable
    "$PYTHON" -c 'import random, socket, sys
for p in [int(a) for a in sys.argv[1:] if a.isdigit()] + random.sample(range(20000, 32000), 500):
    try: socket.socket().bind(("127.0.0.1", p)); print(p); break
    except OSError: pass' "$@"
}
wait_ready() { # port label pid
    local i
    for (( i = 0; i < 300; i++ )); do
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres && return 0
        kill -0 "$3" 2>/dev/null || die "$2 exited during startup"
        sleep 0.1
    done
    die "$2 did not accept connections on 127.0.0.1:$1 within 30 s"
}
psql_at() { PGPASSWORD=$PASSWORD "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -p "$@"; }

start_pg() { # datadir logfile [port]: Postgres on that or a free loopback port (PG_PORT)
    PGDATA_DIR=$1 PG_PORT=${3:-$(free_port)}
    "${AS_PG[@]}" "$PGBIN/postgres" -D "$PGDATA_DIR" -p "$PG_PORT" -k "$PGDATA_DIR" \
        -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off \
        -c jit=off -c max_prepared_transactions=10 >"$2" 2>&1 &
    PG_LAUNCHER=$!
    wait_ready "$PG_PORT" postgres "$PG_LAUNCHER"
    PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")
}

start_pgbudget() { # logfile [port]: pgbudget in front of PG_PORT on PGBUDGET_PORT (that or a free one)
    PGBUDGET_PORT=${2:-$(free_port)}
    cat >"$TMP/budgets.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PGBUDGET_PORT"
mode = "sidecar"
service = "suites"

[auth]
method = "scram-sha-256"
passthrough = true   # roles the suites create log in with their own passwords

[upstreams.primary]
url = "postgres://postgres:$PASSWORD@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
ceiling = 200
reserved = 0
databases = ["*"]

[services.suites]
slice = 20
pool_mode = "transaction"
pin = "allow"
checkout_timeout = "60s"
EOF
    local -a clean_env=(env -u RAILWAY_SERVICE_NAME -u RAILWAY_REPLICA_COUNT -u WEB_CONCURRENCY -u PGBUDGET_LISTEN
        -u PGBUDGET_CONFIG -u PGBUDGET_SLICES -u PGBUDGET_ADMIN_LISTEN)
    "${clean_env[@]}" "$PGBUDGET_BIN" check --config "$TMP/budgets.toml" >"$TMP/check.log" 2>&1 ||
        { cat "$TMP/check.log" >&2; die "pgbudget check rejects $TMP/budgets.toml"; }
    "${clean_env[@]}" RUST_LOG="${PGBUDGET_LOG:-warn}" "$PGBUDGET_BIN" run --config "$TMP/budgets.toml" \
        --admin-listen "" >"$1" 2>&1 &
    PGBUDGET_PID=$!
    wait_ready "$PGBUDGET_PORT" pgbudget "$PGBUDGET_PID"
}

# ---------------------------------------------------------------- the pristine cluster every run starts from
printf '%s\n' "$PASSWORD" >"$TMP/pwfile"
if (( EUID == 0 )); then chown postgres: "$TMP/pwfile"; fi
log "initdb (scram-sha-256, user postgres) in $TMP/template"
"${AS_PG[@]}" "$PGBIN/initdb" -D "$TMP/template" -U postgres -A scram-sha-256 --pwfile="$TMP/pwfile" -E UTF8 \
    --no-instructions >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
hba=() # lines ahead of initdb's (the first match wins), only for the suites that expect them
# pg8000's auth tests ("This requires a line in pg_hba.conf that requires md5 for the database pg8000_md5")
has_suite pg8000 && hba+=("host pg8000_md5 all 127.0.0.1/32 md5" "host pg8000_password all 127.0.0.1/32 password"
    "host pg8000_gss all 127.0.0.1/32 gss" "host pg8000_scram_sha_256 all 127.0.0.1/32 scram-sha-256")
# tokio-postgres: upstream's docker/sql_setup.sh
has_suite tokio-postgres && hba+=("host all pass_user 127.0.0.1/32 password" "host all md5_user 127.0.0.1/32 md5"
    "host all scram_user 127.0.0.1/32 scram-sha-256")
if (( ${#hba[@]} )); then # rewritten in place: the file keeps its owner
    { printf '%s\n' "${hba[@]}"; cat "$TMP/template/pg_hba.conf"; } >"$TMP/pg_hba.conf"
    cat "$TMP/pg_hba.conf" >"$TMP/template/pg_hba.conf"
fi
start_pg "$TMP/template" "$TMP/template.log"
# psycopg2's suite expects its database (with hstore, else its hstore tests skip); asyncpg's uses postgres
# and creates its extensions itself.
psql_at "$PG_PORT" -d postgres -c 'CREATE DATABASE psycopg2_test' ||
    { cat "$TMP/template.log" >&2; die "cannot create the psycopg2_test database"; }
psql_at "$PG_PORT" -d psycopg2_test -c 'CREATE EXTENSION hstore' || die "cannot create extension hstore (contrib)"
if has_suite tokio-postgres; then # sql_setup.sh's roles (stored as SCRAM: password_encryption's default, as there)
    psql_at "$PG_PORT" -d postgres -c "CREATE ROLE pass_user PASSWORD 'password' LOGIN" \
        -c "CREATE ROLE md5_user PASSWORD 'password' LOGIN" -c "CREATE ROLE scram_user PASSWORD 'password' LOGIN" ||
        die "cannot create tokio-postgres's roles"
fi
stop_pg

# What a suite expects in database postgres, run in each of its runs' fresh copies before the tests: asyncpg's
# tests create (and drop) hstore and citext themselves, some without IF NOT EXISTS, so the template has none.
suite_setup_sql() { # suite -> SQL for database postgres
    case $1 in
        pg8000) echo 'CREATE EXTENSION hstore' ;; # as its CI
        tokio-postgres) echo 'CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION ltree' ;;
    esac
}
suite_db() { case $1 in psycopg2) echo psycopg2_test ;; *) echo postgres ;; esac; }

# ---------------------------------------------------------------- suites
prepare_suite() { # suite -> $TMP/suites/NAME with tests/ only (no package source that would shadow the wheel)
    local dir=$TMP/suites/$1 sdist top tests=tests
    case $1 in
        asyncpg) sdist=$(fetch_sdist asyncpg "$ASYNCPG_VERSION") top=asyncpg-$ASYNCPG_VERSION ;;
        psycopg2) sdist=$(fetch_sdist psycopg2 "$PSYCOPG2_VERSION") top=psycopg2-$PSYCOPG2_VERSION ;;
        pg8000) sdist=$(fetch_sdist pg8000 "$PG8000_VERSION") top=pg8000-$PG8000_VERSION tests=test ;;
        tokio-postgres) prepare_tokio_postgres; return ;;
    esac
    mkdir -p "$dir"
    tar -xzf "$sdist" -C "$dir" --strip-components=1 "$top/$tests"
    case $1 in
        asyncpg) # upstream's pytest options ([tool.pytest.ini_options] of its pyproject.toml)
            tar -xzf "$sdist" -C "$dir" --strip-components=1 "$top/pyproject.toml" ;;
        psycopg2) # its modules are unittest suites; their module-level test_suite() builders are not tests
            printf '[pytest]\npython_functions = _no_plain_test_functions_in_psycopg2\n' >"$dir/pytest.ini" ;;
        pg8000) # rootdir here: `test` (a package: test.utils) is this one, not the stdlib's; the sdist's
            # src/pg8000 stays out, so the installed wheel is what runs. test_readme.py: see the header.
            printf '[pytest]\n' >"$dir/pytest.ini"
            rm -f -- "$dir/test/test_readme.py" ;;
    esac
}

# tokio-postgres: the crate copied once into TP_DIR/crate and built there (TP_DIR/target), tests/ rewritten
# for TP_PORT; a file is only written when its text changes, so a second run rebuilds nothing.
TP_DIR=$CACHE/tokio-postgres-$TOKIO_POSTGRES_VERSION TP_PORT=""
prepare_tokio_postgres() {
    local src f rel new=$TMP/tp-rewrite.rs
    src=$(fetch_crate tokio-postgres "$TOKIO_POSTGRES_VERSION")
    mkdir -p -- "$TP_DIR"
    [[ -f $TP_DIR/crate/Cargo.toml ]] || { rm -rf -- "$TP_DIR/crate" && cp -a -- "$src" "$TP_DIR/crate"; }
    TP_PORT=$(free_port "$(cat -- "$TP_DIR/port" 2>/dev/null || true)")
    echo "$TP_PORT" >"$TP_DIR/port"
    while IFS= read -r -d '' f; do
        rel=${f#"$src"/}
        # \b: not user=postgres_x. The port: every connect string and TcpStream::connect("127.0.0.1:5433") of
        # main.rs and runtime.rs (parse.rs only parses strings: its 5433s stay).
        sed -e "s/user=postgres\b/user=postgres password=$PASSWORD/g" -- "$f" >"$new"
        if [[ $rel == tests/test/main.rs || $rel == tests/test/runtime.rs ]]; then sed -i "s/5433/$TP_PORT/g" "$new"; fi
        cmp -s -- "$new" "$TP_DIR/crate/$rel" || cp -- "$new" "$TP_DIR/crate/$rel"
    done < <(find "$src/tests" -type f -name '*.rs' -print0)
    grep -q "port=$TP_PORT user=postgres password=$PASSWORD" "$TP_DIR/crate/tests/test/runtime.rs" ||
        die "rewriting tokio-postgres's tests for port $TP_PORT did not take (did upstream's connect strings change?)"
    log "building tokio-postgres $TOKIO_POSTGRES_VERSION's tests in $TP_DIR (port $TP_PORT), log $OUT/tokio-postgres-build.log"
    # the crate's own Cargo.lock; fetching from the registry is the only network use (none once cached)
    (cd "$TP_DIR/crate" && exec env CARGO_TARGET_DIR="$TP_DIR/target" cargo test --locked --all-features --tests \
        --no-run) >"$OUT/tokio-postgres-build.log" 2>&1 ||
        { tail -n 30 "$OUT/tokio-postgres-build.log" >&2; die "building tokio-postgres's tests failed"; }
}

run_suite() { # suite target port: one pytest run; junit XML, log and exit status into OUT
    local suite=$1 target=$2 port=$3 rc=0 base=$OUT/$1-$2
    [[ $suite == tokio-postgres ]] && { run_cargo_suite "$@"; return; }
    local -a envs=(PGHOST=127.0.0.1 "PGPORT=$port" PGUSER=postgres "PGPASSWORD=$PASSWORD") opts=()
    local args=${PYTEST_ARGS:-tests}
    case $suite in
        asyncpg) envs+=(PGDATABASE=postgres) ;;
        pg8000) envs+=(PGDATABASE=postgres) args=${PYTEST_ARGS:-test} opts=(--benchmark-disable) ;;
        psycopg2) envs+=(PGDATABASE=psycopg2_test PSYCOPG2_TESTDB=psycopg2_test PSYCOPG2_TESTDB_HOST=127.0.0.1
            "PSYCOPG2_TESTDB_PORT=$port" PSYCOPG2_TESTDB_USER=postgres "PSYCOPG2_TESTDB_PASSWORD=$PASSWORD") ;;
    esac
    rm -f -- "$base.xml" "$base.rc"
    log "$suite via $target (127.0.0.1:$port): pytest, log $base.log"
    local t0=$SECONDS summary
    # In the background and waited for, so Ctrl-C / SIGTERM reach the trap (timeout runs in its own process
    # group); `exec` makes PYTEST_PID timeout's pid, which passes a signal on to pytest.
    # shellcheck disable=SC2086 # PYTEST_ARGS is a word list
    (cd "$TMP/suites/$suite" && exec env -u PGSSLMODE -u PGSERVICE -u PGOPTIONS -u PGPASSFILE -u PGSERVICEFILE \
        "${envs[@]}" timeout -s INT -k 60 "$RUN_TIMEOUT" "$PYTHON" -m pytest -p no:cacheprovider -q -rfE \
        --continue-on-collection-errors --timeout="$TEST_TIMEOUT" --junitxml="$base.xml" ${opts[@]+"${opts[@]}"} \
        $args) >"$base.log" 2>&1 &
    PYTEST_PID=$!
    wait "$PYTEST_PID" || rc=$?
    PYTEST_PID=""
    echo "$rc $(( SECONDS - t0 ))" >"$base.rc"
    # pytest's closing line (with asyncpg's --capture=no, warnings may follow it)
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)' "$base.log" | tail -n 1 || true)
    log "  ${summary:-no pytest summary line} (exit $rc, $(( SECONDS - t0 )) s)"
}

run_cargo_suite() { # tokio-postgres target port: one `cargo test` run (built already), its results as junit XML
    local suite=$1 target=$2 port=$3 rc=0 base=$OUT/$1-$2 t0=$SECONDS summary
    rm -f -- "$base.xml" "$base.rc"
    log "$suite via $target (127.0.0.1:$port): cargo test, log $base.log"
    # As pytest's run (timeout signals its whole process group, so the test binary gets the SIGINT too).
    # shellcheck disable=SC2086 # CARGO_TEST_ARGS is a word list
    (cd "$TP_DIR/crate" && exec env CARGO_TARGET_DIR="$TP_DIR/target" RUST_BACKTRACE=0 timeout -s INT -k 60 \
        "$RUN_TIMEOUT" cargo test --locked --offline --all-features --tests -- ${CARGO_TEST_ARGS:-}) \
        >"$base.log" 2>&1 &
    PYTEST_PID=$!
    wait "$PYTEST_PID" || rc=$?
    PYTEST_PID=""
    summary=$(grep -E '^test result: ' "$base.log" | tail -n 1 || true)
    # libtest exits 101 when tests fail, pytest 1 (a failed build has no "test result" line: it stays 101)
    if [[ $rc == 101 && -n $summary ]]; then rc=1; fi
    echo "$rc $(( SECONDS - t0 ))" >"$base.rc"
    "$PYTHON" - "$base.log" "$base.xml" <<'PY' || log "cannot convert $base.log into junit XML"
import re, sys, xml.etree.ElementTree as ET
lines = open(sys.argv[1], errors="replace").read().splitlines()
results, running, messages = {}, set(), {}
for i, line in enumerate(lines):
    if m := re.match(r"test (\S+)(?: - should panic)? \.\.\. (ok|FAILED|ignored)", line):
        results[m[1]] = m[2]
    elif m := re.match(r"test (\S+) has been running for over \d+ seconds", line):
        running.add(m[1])
    elif m := re.fullmatch(r"---- (\S+) stdout ----", line):  # a failure's captured output: its panic message
        block = []
        for l in lines[i + 1:]:
            if l.startswith("---- ") or l == "failures:":
                break
            block.append(l)
        panic = [block[j + 1] for j, l in enumerate(block[:-1]) if "panicked at" in l]
        msg = panic[0] if panic else next((l for l in block if l.strip()), "")
        # an unwrapped tokio_postgres::Error's Debug: keep what the server said, drop the 15 empty fields
        if d := re.search(r'DbError \{ severity: "(\w+)".*? code: SqlState\(E?(\w+)\), message: "((?:[^"\\]|\\.)*)"', msg):
            msg = f'{msg[:msg.find("Error {")]}{d[1]} {d[2]}: {d[3]}'.replace('\\"', '"')
        messages[m[1]] = msg
suite = ET.Element("testsuite", name="tokio-postgres")
for name in sorted(set(results) | running):
    tc = ET.SubElement(suite, "testcase", classname="", name=name)
    if results.get(name) == "FAILED":
        ET.SubElement(tc, "failure", message=messages.get(name) or "FAILED (its output was never printed)")
    elif results.get(name) == "ignored":
        ET.SubElement(tc, "skipped", message="#[ignore]")
    elif name not in results:
        ET.SubElement(tc, "error", message="did not finish: still running when the run stopped")
ET.ElementTree(suite).write(sys.argv[2], encoding="unicode")
PY
    log "  ${summary:-no test result line} (exit $rc, $(( SECONDS - t0 )) s)"
}

mkdir -p "$TMP/suites"
for suite in $SUITES; do
    prepare_suite "$suite"
    for target in direct pgbudget; do
        rm -rf -- "$TMP/pgdata" && cp -a -- "$TMP/template" "$TMP/pgdata" # same pristine cluster for each run
        # tokio-postgres's test binary has its port built in: Postgres's in the direct run, pgbudget's through it
        fixed=""; [[ $suite == tokio-postgres ]] && fixed=$TP_PORT
        start_pg "$TMP/pgdata" "$OUT/postgres-$suite-$target.log" "$([[ $target == direct ]] && echo "$fixed")"
        sql=$(suite_setup_sql "$suite")
        if [[ -n $sql ]]; then psql_at "$PG_PORT" -d postgres -c "$sql" || die "$suite's setup SQL failed: $sql"; fi
        port=$PG_PORT
        if [[ $target == pgbudget ]]; then
            start_pgbudget "$OUT/pgbudget-$suite.log" "$fixed"
            port=$PGBUDGET_PORT
            psql_at "$port" -d "$(suite_db "$suite")" -c 'select 1' >/dev/null || die "smoke query through pgbudget failed"
        fi
        run_suite "$suite" "$target" "$port"
        if [[ -n $PGBUDGET_PID ]] && ! kill -0 "$PGBUDGET_PID" 2>/dev/null; then log "pgbudget died during the run!"; fi
        stop_pgbudget
        stop_pg
    done
done
log "suites done, $SECONDS s in all; logs and junit XML in $OUT"

# ---------------------------------------------------------------- summary
# shellcheck disable=SC2086 # SUITES is a word list
"$PYTHON" - "$OUT" "$TEST_TIMEOUT" $SUITES <<'PY'
import os, sys, xml.etree.ElementTree as ET
out, test_timeout, suites = sys.argv[1], sys.argv[2], sys.argv[3:]
RANK = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}

def load(suite, target):
    """{test id: (status, one-line message)} from pytest's junit XML (None without one), exit status, seconds."""
    base = os.path.join(out, f"{suite}-{target}")
    rc, secs = ((open(base + ".rc").read().split() if os.path.exists(base + ".rc") else []) + ["?", "?"])[:2]
    if not os.path.exists(base + ".xml"):
        return None, rc, secs
    res = {}
    for tc in ET.parse(base + ".xml").getroot().iter("testcase"):
        cls = tc.get("classname") or ""  # empty for a collection error: then name is the module
        tid = (f"{cls}::{tc.get('name', '')}" if cls else tc.get("name", "")).removeprefix("tests.")
        status, msg = "passed", ""
        for child in tc:
            kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if kind and RANK[kind] > RANK[status]:
                if child.get("message"):  # pytest's (or the cargo converter's) message: all of it, on one line
                    msg = " ".join(l.strip() for l in child.get("message").splitlines() if l.strip())
                else:  # no message: the first line of the traceback
                    msg = next(iter((child.text or "").strip().splitlines()), "")
                status, msg = kind, msg[:400]
        if tid not in res or RANK[status] > RANK[res[tid][0]]:
            res[tid] = (status, msg)
    return res, rc, secs
counts = lambda res: "no results" if res is None else "/".join(
    str(sum(1 for s, _ in res.values() if s == k)) for k in ("passed", "failed", "error", "skipped"))
bad = lambda res, t: res is not None and t in res and res[t][0] in ("failed", "error")
rows, details, notes, proxy_fail = [], [], [], False
for suite in suites:
    (d, drc, dsec), (p, prc, psec) = load(suite, "direct"), load(suite, "pgbudget")
    for name, rc, secs in (("direct", drc, dsec), ("pgbudget", prc, psec)):
        if rc not in ("0", "1"):
            notes.append(f"{suite} via {name}: exit {rc} after {secs} s"
                         + (" (RUN_TIMEOUT hit: tests after that point did not run)" if rc == "124" else ""))
            proxy_fail |= name == "pgbudget"
    ids = sorted(set(d or {}) | set(p or {}))
    only_p = [t for t in ids if bad(p, t) and not bad(d, t)]
    only_d = [t for t in ids if bad(d, t) and not bad(p, t)]
    proxy_fail |= bool(only_p) or p is None
    rows.append((suite, counts(d), counts(p), str(len(only_p)), str(len(only_d)), f"{dsec} s / {psec} s"))
    details += [(suite, "fail only through pgbudget", [(t, p[t]) for t in only_p]),
                (suite, "fail only direct", [(t, d[t]) for t in only_d])]

hdr = ("suite", "direct (pass/fail/err/skip)", "pgbudget (pass/fail/err/skip)", "proxy-only failures",
       "direct-only failures", "time direct / pgbudget")
w = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
for r in [()] + [hdr] + rows:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
for n in notes:
    print(f"note: {n}")
for suite, title, items in details:
    print(f"\n{suite}: {len(items)} test(s) {title}", *(f"  {st.upper():6} {t} - {m}" for t, (st, m) in items), sep="\n")
print(f"\n(per-test timeout {test_timeout} s; logs, junit XML: {out})")
sys.exit(1 if proxy_fail else 0)
PY
