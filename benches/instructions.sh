#!/usr/bin/env bash
# User-space instructions per transaction: pgbudget vs PgBouncer, each run under valgrind's callgrind with
# the same pgbench load (select-only, transaction pooling, pool 20). Instruction counts do not depend on how
# busy the machine is, so unlike CPU seconds they compare two builds (or two proxies) without noise; they
# leave out the kernel's share (about 65-90 % of a proxy's CPU on loopback), which benches/pgbench.sh measures.
#
# Knobs (environment): CLIENTS (100), TX (50 transactions per client), MODES ("simple extended"), POOL (20),
# PGBUDGET_BIN (skip the cargo build), PGBOUNCER_BIN (/usr/sbin/pgbouncer), KEEP_TMP=1 (leave the callgrind
# files: callgrind_annotate them).
# Prints one line per proxy and mode: instructions per transaction (logins excluded: counting starts after a
# warm-up run, each measured pgbench run logs its clients in again, which costs both proxies about the same).

set -euo pipefail

CLIENTS=${CLIENTS:-100}
TX=${TX:-50}
MODES=${MODES:-"simple extended"}
POOL=${POOL:-20}
PASSWORD=secret

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd -- "$REPO_ROOT"
log() { printf '[instructions.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[[ -x $PGBIN/postgres ]] || die "no Postgres binaries found (set PGBIN)"
PGBOUNCER_BIN=${PGBOUNCER_BIN:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
[[ -x $PGBOUNCER_BIN ]] || die "pgbouncer not found (set PGBOUNCER_BIN)"
if [[ -z ${PGBUDGET_BIN:-} ]]; then
    cargo build --release --bin pgbudget >&2 || die "cargo build failed"
    PGBUDGET_BIN=$REPO_ROOT/target/release/pgbudget
fi
AS_PG=()
(( EUID == 0 )) && AS_PG=(runuser -u postgres --)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/instructions.XXXXXX")
(( EUID == 0 )) && chown postgres: "$TMP"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    sleep 1
    [[ -s $TMP/pgdata/postmaster.pid ]] && kill -INT "$(head -n 1 "$TMP/pgdata/postmaster.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "keeping $TMP"; else rm -rf -- "$TMP"; fi
}
trap cleanup EXIT

wait_tcp() { # port
    local i
    for (( i = 0; i < 600; i++ )); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1 after 60 s"
}

PG_PORT=$(free_port)
printf '%s\n' "$PASSWORD" >"$TMP/pwfile"
(( EUID == 0 )) && chown postgres: "$TMP/pwfile"
"${AS_PG[@]}" "$PGBIN/initdb" -D "$TMP/pgdata" -U postgres -A scram-sha-256 --pwfile="$TMP/pwfile" >"$TMP/initdb.log" 2>&1 ||
    die "initdb failed"
"${AS_PG[@]}" "$PGBIN/postgres" -D "$TMP/pgdata" -p "$PG_PORT" -k "$TMP/pgdata" -c listen_addresses=127.0.0.1 \
    -c max_connections=300 -c fsync=off >"$TMP/postgres.log" 2>&1 &
wait_tcp "$PG_PORT"
export PGPASSWORD=$PASSWORD PGUSER=postgres PGDATABASE=postgres PGHOST=127.0.0.1 PGSSLMODE=disable
for i in $(seq 50); do "$PGBIN/pg_isready" -q -p "$PG_PORT" && break; sleep 0.2; done
"$PGBIN/pgbench" -i -s 1 -q -p "$PG_PORT" >"$TMP/init.log" 2>&1 || die "pgbench -i failed"

# pgbudget and PgBouncer, each under callgrind (counting off until the warm-up is done).
BUDGET_PORT=$(free_port)
cat >"$TMP/budgets.toml" <<EOF
[proxy]
listen = "127.0.0.1:$BUDGET_PORT"
mode = "sidecar"
service = "bench"
[admin]
listen = ""
[upstreams.primary]
url = "postgres://postgres:$PASSWORD@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
ceiling = 250
reserved = 0
[services.bench]
slice = $POOL
pool_mode = "transaction"
checkout_timeout = "120s"
EOF
BOUNCER_PORT=$(free_port)
VERIFIER=$("$PGBIN/psql" -X -A -t -p "$PG_PORT" -c "select rolpassword from pg_authid where rolname = 'postgres'")
printf '"postgres" "%s"\n' "$VERIFIER" >"$TMP/userlist.txt"
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 1000
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
EOF
(( EUID == 0 )) && chown postgres: "$TMP"/* && chmod 600 "$TMP/userlist.txt"

measure() { # name port pid runner... -> instructions per transaction for each mode
    local name=$1 port=$2 pid=$3 mode out n=0
    shift 3
    for mode in $MODES; do
        n=$((n + 1))
        "$PGBIN/pgbench" -n -S -c "$CLIENTS" -j 2 -t 5 -M "$mode" -p "$port" >/dev/null 2>&1 || die "$name warm-up failed"
        "$@" callgrind_control -z "$pid" >/dev/null
        "$PGBIN/pgbench" -n -S -c "$CLIENTS" -j 2 -t "$TX" -M "$mode" -p "$port" >"$TMP/$name-$mode.out" 2>&1 ||
            die "$name pgbench -M $mode failed: $(tail -n 3 "$TMP/$name-$mode.out")"
        "$@" callgrind_control -d "$pid" >/dev/null
        sleep 1
        local file ir
        file=$(ls -t "$TMP/cg-$name.out".* | head -n 1)
        ir=$(awk '/^summary:/ {print $2}' "$file")
        printf '%-9s -M %-8s %3d clients x %d: %8d instructions per transaction\n' "$name" "$mode" "$CLIENTS" "$TX" \
            $((ir / (CLIENTS * TX)))
    done
}

env -u RAILWAY_SERVICE_NAME RUST_LOG=warn valgrind --tool=callgrind --collect-atstart=yes \
    --callgrind-out-file="$TMP/cg-pgbudget.out" "$PGBUDGET_BIN" run --config "$TMP/budgets.toml" >"$TMP/pgbudget.log" 2>&1 &
PIDS+=($!)
wait_tcp "$BUDGET_PORT"
measure pgbudget "$BUDGET_PORT" "${PIDS[-1]}"

"${AS_PG[@]}" valgrind --tool=callgrind --callgrind-out-file="$TMP/cg-pgbouncer.out" "$PGBOUNCER_BIN" \
    "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stderr" 2>&1 &
wait_tcp "$BOUNCER_PORT"
BOUNCER_PID=$(pgrep -f "pgbouncer $TMP/pgbouncer.ini" | while read -r p; do
    [[ $(cat "/proc/$p/comm") != runuser ]] && echo "$p"; done | tail -n 1)
PIDS+=("$BOUNCER_PID")
# callgrind_control must run as the user valgrind runs as.
measure pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID" "${AS_PG[@]}"
