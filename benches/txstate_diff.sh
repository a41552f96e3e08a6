#!/usr/bin/env bash
# Long run of the TxState-vs-Postgres differential test (tests/txstate_diff/): 5000 cases per profile,
# release build. Extra arguments go to the test binary; PGBUDGET_DIFF_SEED / PGBUDGET_DIFF_PROFILES pass through.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
PGBUDGET_DIFF_CASES=${PGBUDGET_DIFF_CASES:-5000} exec cargo test --release --test txstate_diff -- --nocapture "$@"
