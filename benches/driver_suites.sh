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
# cargo build), PGBUDGET_LOG (RUST_LOG for pgbudget, "warn"), POOL_MODE, SLICE and PIN (the
# service's pool mode, "transaction", slice, 20, and pin, "allow"), CACHE (~/.cache/pgbudget/driver-suites: the
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

# shellcheck source-path=SCRIPTDIR source=suite_lib.sh
source "$SCRIPT_DIR/suite_lib.sh"
ALL_SUITES="asyncpg psycopg2 pg8000 tokio-postgres"
for s in $SUITES; do [[ " $ALL_SUITES " == *" $s "* ]] || die "unknown suite '$s' ($ALL_SUITES)"; done
has_suite() { [[ " $SUITES " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools and Python packages
find_postgres
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

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

build_pgbudget

# ---------------------------------------------------------------- processes
harness_init driver-suites INT # RUN_PID: pytest (SIGINT: it still writes its junit XML) or cargo test
PG_EXTRA_OPTS=(-c max_prepared_transactions=10)

# ---------------------------------------------------------------- the pristine cluster every run starts from
hba=() # pg_hba lines ahead of initdb's, only for the suites that expect them
# pg8000's auth tests ("This requires a line in pg_hba.conf that requires md5 for the database pg8000_md5")
has_suite pg8000 && hba+=("host pg8000_md5 all 127.0.0.1/32 md5" "host pg8000_password all 127.0.0.1/32 password"
    "host pg8000_gss all 127.0.0.1/32 gss" "host pg8000_scram_sha_256 all 127.0.0.1/32 scram-sha-256")
# tokio-postgres: upstream's docker/sql_setup.sh
has_suite tokio-postgres && hba+=("host all pass_user 127.0.0.1/32 password" "host all md5_user 127.0.0.1/32 md5"
    "host all scram_user 127.0.0.1/32 scram-sha-256")
# Their `password` lines ask a cleartext password: this upstream is on loopback, so pgbudget may answer one
# (allow_cleartext_upstream), and tokio-postgres's pass_user is listed with its password, which a passthrough
# role (pgbudget checks it against the SCRAM secret and never learns it) would not have.
if has_suite pg8000 || has_suite tokio-postgres; then ALLOW_CLEARTEXT=${ALLOW_CLEARTEXT:-true}; fi
# Listing a user ends the URL's role's implicit entry: postgres is listed too, with its password, as before.
if has_suite tokio-postgres; then
    export PASS_USER_PW=password SUITE_PG_PW=$PASSWORD
    AUTH_USERS=${AUTH_USERS:-$'[[auth.users]]\nname = "postgres"\npassword_env = "SUITE_PG_PW"\n\n[[auth.users]]\nname = "pass_user"\npassword_env = "PASS_USER_PW"\nupstream_user = "pass_user"\nupstream_password_env = "PASS_USER_PW"'}
fi
init_template ${hba[@]+"${hba[@]}"}
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
    # group); `exec` makes RUN_PID timeout's pid, which passes a signal on to pytest.
    # shellcheck disable=SC2086 # PYTEST_ARGS is a word list
    (cd "$TMP/suites/$suite" && exec env -u PGSSLMODE -u PGSERVICE -u PGOPTIONS -u PGPASSFILE -u PGSERVICEFILE \
        "${envs[@]}" timeout -s INT -k 60 "$RUN_TIMEOUT" "$PYTHON" -m pytest -p no:cacheprovider -q -rfE \
        --continue-on-collection-errors --timeout="$TEST_TIMEOUT" --junitxml="$base.xml" ${opts[@]+"${opts[@]}"} \
        $args) >"$base.log" 2>&1 &
    RUN_PID=$!
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
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
    RUN_PID=$!
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
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
"$PYTHON" - "$OUT" "$TEST_TIMEOUT" "$SCRIPT_DIR" $SUITES <<'PY'
import os, sys
out, test_timeout, here, suites = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, here)
from suite_junit import bad, counts, load as load_base
load = lambda suite, target: load_base(os.path.join(out, f"{suite}-{target}"))
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
