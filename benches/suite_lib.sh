# shellcheck shell=bash
# The process harness shared by driver_suites.sh, psycopg_suite.sh and node_pg_suite.sh, sourced by them (after
# `set -euo pipefail`; sourcing only defines functions): log/die, the Postgres binaries, pgbudget's binary, a
# temp dir with the cleanup trap, free loopback ports, the pristine cluster (initdb), a throwaway Postgres on
# loopback and pgbudget in front of it in transaction mode (POOL_MODE, default "transaction"; slice SLICE,
# default 20; ceiling 200; pin = PIN, default "allow"; [auth] passthrough, databases = ["*"]).
#
# The caller sets: PASSWORD (postgres's), PYTHON (runs free_port), REPO_ROOT (where cargo builds pgbudget),
# PG_EXTRA_OPTS (an array, maybe empty: options appended to postgres's command line), RUN_PID (the pid of the
# test run in progress, "" otherwise: cleanup stops it), and the knobs PGBUDGET_BIN, PGBUDGET_LOG, KEEP_TMP.
# Optional: ALLOW_CLEARTEXT (the upstream's allow_cleartext_upstream, default false) and AUTH_USERS (TOML
# appended to the config, e.g. an [[auth.users]] entry for a role a suite's pg_hba asks a cleartext password of).
# It sets: PGBIN, AS_PG (find_postgres); PGBUDGET_BIN (build_pgbudget); TMP (harness_init); PGDATA_DIR,
# PG_PORT, PG_PID, PG_LAUNCHER (start_pg); PGBUDGET_PORT, PGBUDGET_PID (start_pgbudget).

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${0##*/}" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

find_postgres() { # PGBIN: the server binaries; AS_PG: as root, Postgres runs as the unprivileged postgres user
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/postgres" ]]; then PGBIN=$(pg_config --bindir)
    elif [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then PGBIN=/usr/lib/postgresql/15/bin
    else die "cannot find the Postgres server binaries (pg_config --bindir, /usr/lib/postgresql/15/bin)"; fi
    AS_PG=()
    if (( EUID == 0 )); then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run Postgres as"
        AS_PG=(runuser -u postgres --)
    fi
}

build_pgbudget() { # PGBUDGET_BIN: that one when set, else cargo's release build
    if [[ -n ${PGBUDGET_BIN:-} ]]; then
        [[ -x $PGBUDGET_BIN ]] || die "PGBUDGET_BIN=$PGBUDGET_BIN is not executable"
    else
        log "building pgbudget (cargo build --release --bin pgbudget)"
        cargo build --release --bin pgbudget >&2 || die "cargo build failed"
        PGBUDGET_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/pgbudget
    fi
}

# ---------------------------------------------------------------- processes, cleanup
harness_init() { # name signal: TMP (a fresh NAME.XXXXXX) and the trap that cleans up; SIGNAL stops RUN_PID
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    RUN_SIGNAL=$2
    PG_PID="" PG_LAUNCHER="" PGBUDGET_PID="" PGDATA_DIR="" RUN_PID=""
    trap cleanup EXIT; trap 'exit 130' INT; trap 'exit 143' TERM
    if (( EUID == 0 )); then chown postgres: "$TMP"; fi
}

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
    stop_pid "$RUN_PID" "$RUN_SIGNAL"
    stop_pgbudget
    stop_pg
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "keeping $TMP"; else rm -rf -- "$TMP"; fi
    exit "$rc"
}

# shellcheck disable=SC2120 # its arguments are optional
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

# ---------------------------------------------------------------- the clusters, pgbudget
# shellcheck disable=SC2120 # its arguments are optional
init_template() { # [pg_hba line...]: the pristine cluster in TMP/template (scram-sha-256, user postgres); the
    # lines go ahead of initdb's (the first match wins)
    printf '%s\n' "$PASSWORD" >"$TMP/pwfile"
    if (( EUID == 0 )); then chown postgres: "$TMP/pwfile"; fi
    log "initdb (scram-sha-256, user postgres) in $TMP/template"
    "${AS_PG[@]}" "$PGBIN/initdb" -D "$TMP/template" -U postgres -A scram-sha-256 --pwfile="$TMP/pwfile" -E UTF8 \
        --no-instructions >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
    if (( $# )); then # rewritten in place: the file keeps its owner
        { printf '%s\n' "$@"; cat "$TMP/template/pg_hba.conf"; } >"$TMP/pg_hba.conf"
        cat "$TMP/pg_hba.conf" >"$TMP/template/pg_hba.conf"
    fi
}

start_pg() { # datadir logfile [port]: Postgres on that or a free loopback port (PG_PORT)
    PGDATA_DIR=$1 PG_PORT=${3:-$(free_port)}
    "${AS_PG[@]}" "$PGBIN/postgres" -D "$PGDATA_DIR" -p "$PG_PORT" -k "$PGDATA_DIR" \
        -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off \
        -c jit=off "${PG_EXTRA_OPTS[@]}" >"$2" 2>&1 &
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
passthrough = true   # roles other than postgres (the suites') log in with their own passwords

[upstreams.primary]
url = "postgres://postgres:$PASSWORD@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
ceiling = 200
reserved = 0
databases = ["*"]
allow_cleartext_upstream = ${ALLOW_CLEARTEXT:-false}

[services.suites]
slice = ${SLICE:-20}
pool_mode = "${POOL_MODE:-transaction}"
pin = "${PIN:-allow}"
checkout_timeout = "60s"
${AUTH_USERS:-}
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
