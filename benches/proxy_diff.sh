#!/usr/bin/env bash
# Long run of the proxy-vs-direct differential test (tests/proxy_diff/): 2000 random schedules per profile
# (share 1 and share 2). Extra arguments go to the test binary; PGBUDGET_PROXY_DIFF_SEED passes through.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
PGBUDGET_PROXY_DIFF_CASES=${PGBUDGET_PROXY_DIFF_CASES:-2000} exec cargo test --test proxy_diff proxy_matches_direct -- --nocapture "$@"
