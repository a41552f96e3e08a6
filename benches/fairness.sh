#!/usr/bin/env bash
# Fairness benchmark: two services share one pgbudget (shared mode) and one Postgres, each oversubscribed
# OVERSUB times (clients = OVERSUB x share). Reports, per service: transactions per second, how much of its
# share it kept busy (server time / (share x duration)), its part of all server time, and p50/p99 checkout
# wait from pgbudget's own histogram. Fair means each service keeps its whole share busy and its waits match
# what its own oversubscription implies, whatever the other one does.
#
# Knobs (environment): SHARE_A (10), SHARE_B (5), OVERSUB (5; or OVERSUB_A / OVERSUB_B apart), DURATION (15 s), SLEEP_MS (5: server time per
# transaction), PGBUDGET_BIN (skip the cargo build), KEEP_TMP=1.

set -euo pipefail
SHARE_A=${SHARE_A:-10}
SHARE_B=${SHARE_B:-5}
OVERSUB=${OVERSUB:-5}
OVERSUB_A=${OVERSUB_A:-$OVERSUB}
OVERSUB_B=${OVERSUB_B:-$OVERSUB}
DURATION=${DURATION:-15}
SLEEP_MS=${SLEEP_MS:-5}
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd -- "$REPO_ROOT"
log() { printf '[fairness.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

PGBIN=$(pg_config --bindir 2>/dev/null || true)
[[ -x ${PGBIN:-}/postgres ]] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
[[ -x $PGBIN/postgres ]] || die "cannot find the Postgres server binaries"
if [[ -z ${PGBUDGET_BIN:-} ]]; then
    cargo build --release --bin pgbudget >&2 || die "cargo build failed"
    PGBUDGET_BIN=$REPO_ROOT/target/release/pgbudget
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

TMP=$(mktemp -d /tmp/pgbudget-fairness.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f $TMP/pg/postmaster.pid ]] && kill -INT "$(head -1 "$TMP/pg/postmaster.pid")" 2>/dev/null || true
    sleep 1
    [[ ${KEEP_TMP:-0} == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT
as_pg() { if (( EUID == 0 )); then runuser -u postgres -- "$@"; else "$@"; fi; }
if (( EUID == 0 )); then chown postgres "$TMP"; fi

PG_PORT=$(free_port)
echo secret >"$TMP/pw"
chmod 644 "$TMP/pw"
as_pg "$PGBIN/initdb" -D "$TMP/pg" -U postgres --pwfile="$TMP/pw" -A scram-sha-256 >/dev/null
as_pg "$PGBIN/postgres" -D "$TMP/pg" -p "$PG_PORT" -k "$TMP" -c listen_addresses=127.0.0.1 -c max_connections=100 \
    >"$TMP/pg.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done

PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$TMP/budgets.toml" <<EOF
[proxy]
mode = "shared"
service_from = "application_name"
trust_application_name = true
[auth]
method = "trust"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstreams.primary]
url = "postgres://postgres:secret@127.0.0.1:$PG_PORT/postgres"
ceiling = 90
[services.a]
slice = $SHARE_A
checkout_timeout = "60s"
[services.b]
slice = $SHARE_B
checkout_timeout = "60s"
EOF
RUST_LOG=warn "$PGBUDGET_BIN" run --config "$TMP/budgets.toml" --listen "127.0.0.1:$PROXY_PORT" >"$TMP/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break; sleep 0.1; done

echo "select pg_sleep($SLEEP_MS / 1000.0);" >"$TMP/tx.sql"
run() { # service clients
    PGAPPNAME=$1 "$PGBIN/pgbench" -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -n -c "$2" -j 1 -T "$DURATION" \
        -f "$TMP/tx.sql" postgres >"$TMP/$1.out" 2>"$TMP/$1.err" || true
}
log "a: share $SHARE_A, $((SHARE_A * OVERSUB_A)) clients; b: share $SHARE_B, $((SHARE_B * OVERSUB_B)) clients; ${DURATION}s, ${SLEEP_MS}ms per transaction"
run a $((SHARE_A * OVERSUB_A)) &
A=$!
run b $((SHARE_B * OVERSUB_B)) &
B=$!
wait $A $B
curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" >"$TMP/metrics.txt"

python3 - "$TMP" "$DURATION" "$SLEEP_MS" "$SHARE_A" "$SHARE_B" "$OVERSUB_A" "$OVERSUB_B" <<'PY'
import re, sys
tmp, dur, sleep_ms = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
share = {"a": int(sys.argv[4]), "b": int(sys.argv[5])}
oversub = {"a": int(sys.argv[6]), "b": int(sys.argv[7])}
metrics = open(f"{tmp}/metrics.txt").read()
def quantile(svc, q):
    rows = re.findall(r'pgbudget_checkout_wait_seconds_bucket\{route="rw",service="%s",le="([^"]+)"\} (\d+)' % svc, metrics)
    rows = [(float("inf") if le == "+Inf" else float(le), int(n)) for le, n in rows]
    total = rows[-1][1] if rows else 0
    for le, n in rows:
        if total and n >= q * total:
            return le
    return float("nan")
tx = {}
for s in share:
    out = open(f"{tmp}/{s}.out").read()
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    tx[s] = int(m.group(1)) if m else 0
server = {s: tx[s] * sleep_ms / 1000.0 for s in share}
total = sum(server.values()) or 1
print(f"{'service':<8} {'share':>5} {'clients':>7} {'tps':>8} {'share busy':>10} {'of server time':>14} {'wait p50 <=':>11} {'wait p99 <=':>11}")
for s in share:
    print(f"{s:<8} {share[s]:>5} {share[s] * oversub[s]:>7} "
          f"{tx[s]/dur:>8.0f} {server[s]/(share[s]*dur):>10.1%} {server[s]/total:>14.1%} "
          f"{quantile(s, 0.5)*1000:>9.1f}ms {quantile(s, 0.99)*1000:>9.1f}ms")
print(f"expected part of server time by share: a {share['a']/(share['a']+share['b']):.1%}, b {share['b']/(share['a']+share['b']):.1%}")
print("(wait quantiles are histogram bucket upper bounds)")
PY
