#!/usr/bin/env bash
# TLS comparison, one interleaved run of benches/pgbench.sh with TLS=1: pgbench -S (simple protocol) with
# sslmode=require to direct Postgres, to pgbudget ([tls] mode = "require", upstream ?sslmode=require) and to
# PgBouncer 1.18 (client_tls_sslmode and server_tls_sslmode = require), transaction pooling, the same pool.
# Every client logs in once per run (pgbench keeps its connections), so this measures the relay's cost of TLS
# records, not handshakes. Target: pgbudget TPS >= PgBouncer's at every client count.
#
# Knobs: everything benches/pgbench.sh takes; defaults here: CLIENTS ("10 100"), ROUNDS (3), DURATION (10 s),
# OUT (target/pgbench-tls-results.csv). About 4 minutes on a 2-core machine.
set -euo pipefail
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
export TLS=1
export CLIENTS=${CLIENTS:-"10 100"}
export ROUNDS=${ROUNDS:-3}
export DURATION=${DURATION:-10}
export OUT=${OUT:-target/pgbench-tls-results.csv}
exec bash "$SCRIPT_DIR/pgbench.sh"
