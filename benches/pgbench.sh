#!/usr/bin/env bash
# pgbench harness: direct Postgres vs pgbudget vs PgBouncer, interleaved in one run.
#
# Starts a throwaway Postgres cluster, one pgbudget and one PgBouncer (both in transaction
# pooling mode with the same pool size), then runs pgbench against each target in an order rotated every round
# and reversed every other round (each target follows each other one as often, with an even ROUNDS), waiting
# after each run until its backends have exited, for every client count and round. Prints median TPS, TPS
# ratios and proxy CPU seconds per 1,000 transactions; raw per-run rows go to a CSV file.
#
# Knobs (environment): CLIENTS ("10 100 500"), ROUNDS (2), DURATION (15 s), POOL (20),
# THREADS (2), MODE (simple|extended|prepared), MODE_DIRECT / MODE_PGBUDGET / MODE_PGBOUNCER (per-target
# override of MODE), SCRIPT (select-only|simple-update|tpcb-like), SCRIPTS (space-separated list, default
# SCRIPT), SCALE (10), OUT (target/pgbench-results.csv), PGBUDGET_BIN (skip the cargo build),
# PGBOUNCER_BIN (/usr/sbin/pgbouncer or PATH), KEEP_GOING=1 (record a failed pgbench run and go on),
# KEEP_TMP=1 (leave the temp dir behind), TLS=1 (every hop TLS: pgbench to each target with sslmode=require,
# pgbudget and PgBouncer to Postgres with TLS too; a throwaway self-signed certificate made with openssl).
# benches/pgbench_prepared.sh runs the prepared-statement comparison, benches/pgbench_tls.sh the TLS one.
# See benches/README.md.

set -euo pipefail

# ---------------------------------------------------------------- settings
CLIENTS=${CLIENTS:-"10 100 500"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
POOL=${POOL:-20}
THREADS=${THREADS:-2}
MODE=${MODE:-simple}
SCRIPT=${SCRIPT:-select-only}
SCRIPTS=${SCRIPTS:-$SCRIPT}
KEEP_GOING=${KEEP_GOING:-0}
SCALE=${SCALE:-10}
TLS=${TLS:-0}
PASSWORD=secret
PGUSER_NAME=postgres
TARGETS=(direct pgbudget pgbouncer)

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd -- "$REPO_ROOT"
OUT=${OUT:-target/pgbench-results.csv}

log() { printf '[pgbench.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]] && (( $1 > 0 )); }
is_uint "$ROUNDS" || die "ROUNDS must be a positive integer (got '$ROUNDS')"
is_uint "$DURATION" || die "DURATION must be a positive integer (got '$DURATION')"
is_uint "$POOL" || die "POOL must be a positive integer (got '$POOL')"
is_uint "$THREADS" || die "THREADS must be a positive integer (got '$THREADS')"
is_uint "$SCALE" || die "SCALE must be a positive integer (got '$SCALE')"
read -r -a CLIENT_LIST <<<"$CLIENTS"
(( ${#CLIENT_LIST[@]} > 0 )) || die "CLIENTS is empty"
for c in "${CLIENT_LIST[@]}"; do
    is_uint "$c" || die "CLIENTS must be positive integers (got '$c')"
    (( c <= 590 )) || die "client count $c exceeds what max_connections=600 allows for the direct target"
done
# Query protocol per target: MODE unless MODE_<TARGET> overrides it (e.g. prepared for direct and pgbudget,
# extended for PgBouncer 1.18, which cannot track named prepared statements in transaction mode).
declare -A MODE_OF=([direct]=${MODE_DIRECT:-$MODE} [pgbudget]=${MODE_PGBUDGET:-$MODE} [pgbouncer]=${MODE_PGBOUNCER:-$MODE})
for t in "${TARGETS[@]}"; do
    case ${MODE_OF[$t]} in simple | extended | prepared) ;; *) die "query mode for $t must be simple, extended or prepared (got '${MODE_OF[$t]}')" ;; esac
done
if [[ ${MODE_OF[pgbouncer]} == prepared ]]; then
    log "warning: PgBouncer runs with -M prepared (named prepared statements); PgBouncer < 1.21 in transaction mode does not support them"
fi
read -r -a SCRIPT_LIST <<<"$SCRIPTS"
(( ${#SCRIPT_LIST[@]} > 0 )) || die "SCRIPTS is empty"
for s in "${SCRIPT_LIST[@]}"; do
    case $s in select-only | simple-update | tpcb-like) ;; *) die "scripts must be select-only, simple-update or tpcb-like (got '$s')" ;; esac
done

# ---------------------------------------------------------------- tools
command -v python3 >/dev/null || die "python3 is required (free-port picking and the summary table)"
if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/postgres" ]]; then
    PGBIN=$(pg_config --bindir)
elif [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then
    PGBIN=/usr/lib/postgresql/15/bin
else
    die "cannot find the Postgres server binaries (pg_config --bindir, /usr/lib/postgresql/15/bin)"
fi
for b in initdb postgres pgbench psql pg_isready; do
    [[ -x $PGBIN/$b ]] || die "missing $PGBIN/$b"
done
PGBOUNCER_BIN=${PGBOUNCER_BIN:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
[[ -x $PGBOUNCER_BIN ]] || die "pgbouncer not found (install the 'pgbouncer' package or set PGBOUNCER_BIN)"
CLK_TCK=$(getconf CLK_TCK)

if [[ -n ${PGBUDGET_BIN:-} ]]; then
    [[ -x $PGBUDGET_BIN ]] || die "PGBUDGET_BIN=$PGBUDGET_BIN is not executable"
else
    log "building pgbudget (cargo build --release --bin pgbudget)"
    cargo build --release --bin pgbudget >&2 || die "cargo build failed"
    PGBUDGET_BIN=$REPO_ROOT/target/release/pgbudget
fi

# Servers must not run as root: run Postgres and PgBouncer as the unprivileged postgres user.
if (( EUID == 0 )); then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the servers as"
    AS_PG=(runuser -u postgres --)
else
    AS_PG=()
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-harness.XXXXXX")
PGDATA_DIR=$TMP/pgdata
PG_PID="" PGBUDGET_PID="" PGBOUNCER_PID="" PG_LAUNCHER="" PGBOUNCER_LAUNCHER=""

print_tail() { # file label
    if [[ -s $1 ]]; then
        printf '\n----- last 30 lines of %s (%s) -----\n' "$2" "$1" >&2
        tail -n 30 -- "$1" >&2 || true
        printf -- '----- end of %s -----\n' "$2" >&2
    elif [[ -e $1 ]]; then
        printf '\n----- %s (%s) is empty -----\n' "$2" "$1" >&2
    fi
}

stop_pid() { # pid signal
    local pid=$1 sig=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop after SIG$sig within 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if (( rc != 0 )); then
        print_tail "$TMP/pgbudget.log" "pgbudget log"
        print_tail "$TMP/pgbouncer.log" "pgbouncer log"
        print_tail "$TMP/postgres.log" "postgres log"
    fi
    stop_pid "$PGBUDGET_PID" TERM
    stop_pid "$PGBOUNCER_PID" INT
    if [[ -z $PG_PID && -s $PGDATA_DIR/postmaster.pid ]]; then
        PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")
    fi
    stop_pid "$PG_PID" INT
    stop_pid "$PGBOUNCER_LAUNCHER" TERM # runuser wrappers: normally gone already
    stop_pid "$PG_LAUNCHER" TERM
    wait 2>/dev/null || true # reap runuser wrappers and background jobs
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        log "keeping $TMP"
    else
        rm -rf -- "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if (( EUID == 0 )); then chown postgres: "$TMP"; fi

wait_tcp() { # port label pid
    local port=$1 label=$2 pid=$3 i
    for (( i = 0; i < 300; i++ )); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$label exited before listening on 127.0.0.1:$port"
        sleep 0.1
    done
    die "$label did not accept connections on 127.0.0.1:$port within 30 s"
}

# ---------------------------------------------------------------- Postgres
PG_PORT=$(free_port)
printf '%s\n' "$PASSWORD" >"$TMP/pwfile"
if (( EUID == 0 )); then chown postgres: "$TMP/pwfile"; fi
log "initdb in $PGDATA_DIR"
"${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U "$PGUSER_NAME" -A scram-sha-256 \
    --pwfile="$TMP/pwfile" -E UTF8 --no-instructions >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }

PG_TLS=()
if [[ $TLS == 1 ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TMP/tls.key" -out "$TMP/tls.crt" -days 1 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost >"$TMP/openssl.log" 2>&1 ||
        { cat "$TMP/openssl.log" >&2; die "openssl could not make a certificate"; }
    chmod 600 "$TMP/tls.key"
    if (( EUID == 0 )); then chown postgres: "$TMP/tls.key" "$TMP/tls.crt"; fi
    PG_TLS=(-c ssl=on -c "ssl_cert_file=$TMP/tls.crt" -c "ssl_key_file=$TMP/tls.key")
fi
log "starting postgres on 127.0.0.1:$PG_PORT (TLS=$TLS)"
"${AS_PG[@]}" "$PGBIN/postgres" -D "$PGDATA_DIR" -p "$PG_PORT" -k "$PGDATA_DIR" \
    -c listen_addresses=127.0.0.1 -c max_connections=600 -c fsync=off \
    -c synchronous_commit=off "${PG_TLS[@]}" >"$TMP/postgres.log" 2>&1 &
PG_LAUNCHER=$!
for (( i = 0; ; i++ )); do
    if [[ -z $PG_PID && -s $PGDATA_DIR/postmaster.pid ]]; then
        PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")
    fi
    if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U "$PGUSER_NAME" -d postgres; then
        break
    fi
    kill -0 "$PG_LAUNCHER" 2>/dev/null || die "postgres exited during startup"
    (( i < 300 )) || die "postgres did not become ready on 127.0.0.1:$PG_PORT within 30 s"
    sleep 0.1
done
[[ -n $PG_PID ]] || PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")

SSLMODE=disable
[[ $TLS == 1 ]] && SSLMODE=require
export PGPASSWORD=$PASSWORD PGUSER=$PGUSER_NAME PGDATABASE=postgres PGHOST=127.0.0.1 PGSSLMODE=$SSLMODE
unset PGSERVICE PGOPTIONS

log "pgbench -i -s $SCALE (direct)"
"$PGBIN/pgbench" -i -s "$SCALE" -q -p "$PG_PORT" >"$TMP/pgbench-init.log" 2>&1 ||
    { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------- pgbudget
PGBUDGET_PORT=$(free_port)
cat >"$TMP/budgets.toml" <<EOF
[proxy]
listen = "127.0.0.1:0"
mode = "sidecar"
service = "bench"

$( [[ $TLS == 1 ]] && printf '[tls]\nmode = "require"\ncert = "%s"\nkey = "%s"\n' "$TMP/tls.crt" "$TMP/tls.key" )

[upstreams.primary]
url = "postgres://$PGUSER_NAME:$PASSWORD@127.0.0.1:$PG_PORT/postgres?sslmode=$SSLMODE"
ceiling = 500
reserved = 0

[services.bench]
slice = $POOL
pool_mode = "transaction"
checkout_timeout = "60s"
EOF
log "starting pgbudget ($PGBUDGET_BIN) on 127.0.0.1:$PGBUDGET_PORT, pool $POOL"
# Sidecar mode takes its service from RAILWAY_SERVICE_NAME when set; keep the bench service.
env -u RAILWAY_SERVICE_NAME -u RAILWAY_REPLICA_COUNT -u WEB_CONCURRENCY -u PGBUDGET_LISTEN RUST_LOG=warn \
    "$PGBUDGET_BIN" run --config "$TMP/budgets.toml" --listen "127.0.0.1:$PGBUDGET_PORT" \
    >"$TMP/pgbudget.log" 2>&1 &
PGBUDGET_PID=$!
wait_tcp "$PGBUDGET_PORT" pgbudget "$PGBUDGET_PID"

# ---------------------------------------------------------------- PgBouncer
PGBOUNCER_PORT=$(free_port)
# The server's own SCRAM verifier, not the plaintext: with a plaintext entry PgBouncer derives a verifier
# (4096 PBKDF2 rounds) on every login, which pgbudget never does, and the CPU comparison would charge that
# to PgBouncer. With the verifier it authenticates clients and passes SCRAM through to the server.
VERIFIER=$("$PGBIN/psql" -X -A -t -p "$PG_PORT" -c "select rolpassword from pg_authid where rolname = '$PGUSER_NAME'") ||
    die "cannot read the SCRAM verifier of $PGUSER_NAME"
printf '"%s" "%s"\n' "$PGUSER_NAME" "$VERIFIER" >"$TMP/userlist.txt"
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
max_db_connections = 0
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
if [[ $TLS == 1 ]]; then
    printf 'client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\nserver_tls_sslmode = require\n' \
        "$TMP/tls.crt" "$TMP/tls.key" >>"$TMP/pgbouncer.ini"
fi
if (( EUID == 0 )); then
    chown postgres: "$TMP/userlist.txt" "$TMP/pgbouncer.ini"
    chmod 600 "$TMP/userlist.txt"
fi
log "starting pgbouncer ($PGBOUNCER_BIN) on 127.0.0.1:$PGBOUNCER_PORT, pool $POOL"
# PgBouncer writes its own logfile; stdout/stderr only matter if it fails before opening it.
# runuser's PAM session resets the soft fd limit (often to 1024): raise it for max_client_conn.
# shellcheck disable=SC2016 # $0/$@ belong to the inner shell
"${AS_PG[@]}" /bin/sh -c 'ulimit -n 4096 2>/dev/null || :; exec "$0" "$@"' \
    "$PGBOUNCER_BIN" "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stderr" 2>&1 &
PGBOUNCER_LAUNCHER=$!
for (( i = 0; ; i++ )); do
    if [[ -s $TMP/pgbouncer.pid ]]; then
        PGBOUNCER_PID=$(<"$TMP/pgbouncer.pid")
        break
    fi
    if ! kill -0 "$PGBOUNCER_LAUNCHER" 2>/dev/null; then
        cat "$TMP/pgbouncer.stderr" >&2 || true
        die "pgbouncer exited during startup"
    fi
    (( i < 300 )) || die "pgbouncer wrote no pidfile within 30 s"
    sleep 0.1
done
wait_tcp "$PGBOUNCER_PORT" pgbouncer "$PGBOUNCER_PID"

# ---------------------------------------------------------------- smoke test each target
declare -A PORT_OF=([direct]=$PG_PORT [pgbudget]=$PGBUDGET_PORT [pgbouncer]=$PGBOUNCER_PORT)
declare -A PID_OF=([direct]="" [pgbudget]=$PGBUDGET_PID [pgbouncer]=$PGBOUNCER_PID)
for t in "${TARGETS[@]}"; do
    if ! got=$("$PGBIN/psql" -X -A -t -p "${PORT_OF[$t]}" -c 'select count(*) from pgbench_branches' 2>"$TMP/smoke-$t.err"); then
        cat "$TMP/smoke-$t.err" >&2
        die "smoke query through $t (port ${PORT_OF[$t]}) failed"
    fi
    [[ $got == "$SCALE" ]] || die "smoke query through $t returned '$got', expected $SCALE"
done
log "all targets answer: direct :$PG_PORT, pgbudget :$PGBUDGET_PORT (pid $PGBUDGET_PID), pgbouncer :$PGBOUNCER_PORT (pid $PGBOUNCER_PID)"

# ---------------------------------------------------------------- measurement
cpu_ticks() { # pid -> utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat)
    local stat rest
    stat=$(<"/proc/$1/stat") || die "cannot read /proc/$1/stat (did the process die?)"
    rest=${stat##*) } # drop "pid (comm) ": comm may contain spaces
    # rest starts at field 3 (state), so utime (14) and stime (15) are its 12th and 13th words.
    awk '{ print $12 + $13 }' <<<"$rest"
}

rss_kib() { # pid -> "VmRSS,RssAnon" in KiB: all resident pages, and the private ones (not file-backed)
    awk '/^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } END { if (r != "") print r "," a }' "/proc/$1/status" 2>/dev/null
}

# Between runs: wait (up to 30 s) until the backends of the run before have exited, down to what the two
# proxies' pools hold, then a second more; a direct run at 500 clients leaves 500 backends exiting, which
# would otherwise slow whichever target runs next.
settle() {
    local i n
    for (( i = 0; i < 150; i++ )); do
        n=$("$PGBIN/psql" -X -A -t -p "$PG_PORT" -c "select count(*) from pg_stat_activity where backend_type = 'client backend'" 2>/dev/null) || n=""
        [[ -n $n ]] && (( n <= 2 * POOL + 1 )) && break
        sleep 0.2
    done
    sleep 1
}

mkdir -p -- "$(dirname -- "$OUT")"
echo "round,position,clients,target,tps,transactions,proxy_cpu_s,proxy_cpu_s_per_1k_txn,duration_s,pool,mode,script,threads,failed_txns,aborted_clients,rc,proxy_rss_kib,proxy_anon_kib" >"$OUT"

run_count=0
total_runs=$(( ${#SCRIPT_LIST[@]} * ${#CLIENT_LIST[@]} * ROUNDS * ${#TARGETS[@]} ))
for SCRIPT in "${SCRIPT_LIST[@]}"; do
    for c in "${CLIENT_LIST[@]}"; do
        threads=$THREADS
        if (( threads > c )); then threads=$c; fi
        for (( r = 0; r < ROUNDS; r++ )); do
            for (( k = 0; k < ${#TARGETS[@]}; k++ )); do
                # Rotated every round, and reversed every other round: a cyclic shift alone keeps each target's
                # successor fixed (pgbudget would always run right after the direct run, the one that leaves
                # hundreds of backends exiting behind it).
                n=${#TARGETS[@]}
                if (( r % 2 == 0 )); then idx=$(( (k + r) % n )); else idx=$(( (n - 1 - k + r) % n )); fi
                t=${TARGETS[$idx]}
                pid=${PID_OF[$t]}
                run_count=$(( run_count + 1 ))
                mode=${MODE_OF[$t]}
                log "run $run_count/$total_runs: script=$SCRIPT clients=$c round=$(( r + 1 )) target=$t mode=$mode"
                if [[ -n $pid ]]; then
                    kill -0 "$pid" 2>/dev/null || die "$t (pid $pid) is no longer running"
                    before=$(cpu_ticks "$pid")
                    # The proxy's resident memory while every client is connected and busy: sampled halfway.
                    rm -f -- "$TMP/rss"
                    ( sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"; rss_kib "$pid" >"$TMP/rss" ) &
                    rss_job=$!
                fi
                rc=0
                "$PGBIN/pgbench" -n -b "$SCRIPT" -M "$mode" -c "$c" -j "$threads" -T "$DURATION" \
                    -p "${PORT_OF[$t]}" >"$TMP/run.out" 2>"$TMP/run.err" || rc=$?
                cpu_s=""
                rss=""
                if [[ -z $pid ]]; then rss=","; fi
                if [[ -n $pid ]]; then
                    wait "$rss_job" 2>/dev/null || true
                    rss=$(cat -- "$TMP/rss" 2>/dev/null || echo ,)
                    if kill -0 "$pid" 2>/dev/null; then
                        after=$(cpu_ticks "$pid")
                        cpu_s=$(awk -v a="$after" -v b="$before" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", (a - b) / hz }')
                    else
                        log "$t (pid $pid) died during the run"
                        if (( rc == 0 )); then rc=99; fi
                    fi
                fi
                tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$TMP/run.out")
                txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*$/\1/p' "$TMP/run.out")
                failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*$/\1/p' "$TMP/run.out")
                aborted=$(grep -c 'aborted' "$TMP/run.err" || true)
                if (( rc != 0 )) || [[ -z $tps || -z $txns ]]; then
                    printf '\n===== pgbench against %s (script=%s clients=%s, round %s) failed: exit %s =====\n' "$t" "$SCRIPT" "$c" "$(( r + 1 ))" "$rc" >&2
                    echo "--- pgbench stdout ---" >&2
                    cat "$TMP/run.out" >&2
                    echo "--- pgbench stderr (first 40 lines) ---" >&2
                    head -n 40 "$TMP/run.err" >&2
                    if [[ $KEEP_GOING != 1 ]]; then
                        die "pgbench run failed (target=$t clients=$c)"
                    fi
                    log "KEEP_GOING=1: recording the failed run (rc=$rc, stderr lines with 'aborted': $aborted) and going on"
                    if (( rc == 0 )); then rc=98; fi
                fi
                if grep -q . "$TMP/run.err"; then
                    log "pgbench stderr (non-fatal) for $t c=$c: $(head -n 5 "$TMP/run.err" | tr '\n' ' ')"
                fi
                per1k=""
                if [[ -n $cpu_s && -n $txns ]]; then
                    per1k=$(awk -v s="$cpu_s" -v n="$txns" 'BEGIN { if (n > 0) printf "%.5f", s / (n / 1000); }')
                fi
                log "  tps=$tps txns=$txns failed=${failed:-?}${cpu_s:+ proxy_cpu=${cpu_s}s per1k=${per1k}s}"
                settle
                echo "$(( r + 1 )),$(( k + 1 )),$c,$t,$tps,$txns,$cpu_s,$per1k,$DURATION,$POOL,$mode,$SCRIPT,$threads,$failed,$aborted,$rc,$rss" >>"$OUT"
            done
        done
    done
done

# ---------------------------------------------------------------- summary
log "raw results: $OUT"
python3 - "$OUT" <<'PY'
import csv, statistics, sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
tps = defaultdict(list)
cpu = defaultdict(list)
rss = defaultdict(list)
mode = {}
bad = defaultdict(int)
for r in rows:
    key = (r["script"], int(r["clients"]), r["target"])
    mode[r["target"]] = r["mode"]
    if r["rc"] != "0" or r["failed_txns"] not in ("", "0") or r["aborted_clients"] not in ("", "0"):
        bad[key] += 1
    if not r["tps"]:
        continue
    tps[key].append(float(r["tps"]))
    if r["proxy_cpu_s_per_1k_txn"]:
        cpu[key].append(float(r["proxy_cpu_s_per_1k_txn"]))
    if r.get("proxy_rss_kib"):
        rss[key].append((float(r["proxy_rss_kib"]) / 1024, float(r["proxy_anon_kib"] or 0) / 1024))

def med(xs):
    return statistics.median(xs) if xs else float("nan")

def ratio(a, b):
    return f"{a / b:.3f}" if b and a == a and b == b else "n/a"

first = rows[0]
modes = ", ".join(f"{t} -M {mode[t]}" for t in ("direct", "pgbudget", "pgbouncer") if t in mode)
hdr = ("clients", "direct tps", "pgbudget tps", "pgbouncer tps", "budget/bouncer", "budget/direct",
       "budget cpu s/1k", "bouncer cpu s/1k", "cpu budget/bouncer", "budget rss (anon)", "bouncer rss (anon)")
fmt = "{:>7}  {:>11}  {:>12}  {:>13}  {:>14}  {:>13}  {:>15}  {:>16}  {:>18}  {:>18}  {:>18}"
for script in dict.fromkeys(r["script"] for r in rows):
    print()
    print(f"pgbench -b {script} ({modes}), {first['duration_s']} s per run, pool {first['pool']}, "
          f"{max(int(r['round']) for r in rows)} round(s), median over rounds")
    print(fmt.format(*hdr))
    for c in sorted({k[1] for k in tps if k[0] == script}):
        d, b, p = (med(tps[(script, c, t)]) for t in ("direct", "pgbudget", "pgbouncer"))
        bc, pc = med(cpu[(script, c, "pgbudget")]), med(cpu[(script, c, "pgbouncer")])
        def mem(t):
            xs = rss[(script, c, t)]
            return f"{max(x[0] for x in xs):.1f} ({max(x[1] for x in xs):.1f})" if xs else "n/a"
        br, pr = mem("pgbudget"), mem("pgbouncer")
        print(fmt.format(c, f"{d:.0f}", f"{b:.0f}", f"{p:.0f}", ratio(b, p), ratio(b, d),
                         f"{bc:.4f}", f"{pc:.4f}", ratio(bc, pc), br, pr))
if bad:
    print()
    for (script, c, t), n in sorted(bad.items()):
        print(f"warning: {n} run(s) with failed transactions, aborted clients or a non-zero exit: "
              f"script={script} clients={c} target={t} (see the CSV)")
PY
