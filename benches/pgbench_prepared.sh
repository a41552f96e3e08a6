#!/usr/bin/env bash
# Prepared-statement comparison, one interleaved run of benches/pgbench.sh:
#   direct Postgres  pgbench -M prepared
#   pgbudget         pgbench -M prepared  (transaction pooling: named statements mapped to pool statements)
#   PgBouncer 1.18   pgbench -M extended  (transaction pooling cannot carry named prepared statements before 1.21)
# Same pool size for both proxies, select-only and TPC-B-like, the three targets rotating within every round.
# Afterwards checks the target: pgbudget prepared TPS >= TARGET_RATIO x PgBouncer extended TPS at
# TARGET_CLIENTS clients (median over rounds), per script.
#
# Knobs: everything benches/pgbench.sh takes; defaults here: SCRIPTS ("select-only tpcb-like"), ROUNDS (3),
# DURATION (10 s), KEEP_GOING (1), OUT (target/pgbench-prepared-results.csv), TARGET_RATIO (1.2),
# TARGET_CLIENTS (100). The default run (3 client counts x 2 scripts x 3 rounds x 3 targets x 10 s) takes
# about 11 minutes on a 2-core machine.

set -euo pipefail
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

export MODE_DIRECT=${MODE_DIRECT:-prepared}
export MODE_PGBUDGET=${MODE_PGBUDGET:-prepared}
export MODE_PGBOUNCER=${MODE_PGBOUNCER:-extended}
export SCRIPTS=${SCRIPTS:-"select-only tpcb-like"}
export ROUNDS=${ROUNDS:-3}
export DURATION=${DURATION:-10}
export KEEP_GOING=${KEEP_GOING:-1}
export OUT=${OUT:-target/pgbench-prepared-results.csv}
TARGET_RATIO=${TARGET_RATIO:-1.2}
TARGET_CLIENTS=${TARGET_CLIENTS:-100}

bash "$SCRIPT_DIR/pgbench.sh"

cd -- "$REPO_ROOT"
python3 - "$OUT" "$TARGET_RATIO" "$TARGET_CLIENTS" <<'PY'
import csv, statistics, sys
from collections import defaultdict

path, want, clients = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tps = defaultdict(list)
for r in csv.DictReader(open(path)):
    if r["clients"] == clients and r["tps"] and r["rc"] == "0":
        tps[(r["script"], r["target"])].append(float(r["tps"]))
print()
for script in dict.fromkeys(s for s, _ in tps):
    b, p = tps.get((script, "pgbudget")), tps.get((script, "pgbouncer"))
    if not b or not p:
        print(f"target {script} @ {clients} clients: n/a (missing successful runs)")
        continue
    ratio = statistics.median(b) / statistics.median(p)
    verdict = "met" if ratio >= want else "NOT met"
    print(f"target {script} @ {clients} clients: pgbudget prepared / pgbouncer extended = {ratio:.3f} "
          f"(want >= {want}): {verdict}")
PY
