#!/usr/bin/env bash
# node-postgres's own test suite (the `pg` npm package), direct vs through pgbudget (transaction pooling).
#
# Runs upstream's packages/pg tests as its Makefile does (`make test-unit test-integration`: every
# test/unit/**/*-tests.js and test/integration/**/*-tests.js as `node FILE postgres://`, pure JavaScript, no
# pg-native, no test/native, no Cloudflare worker tests) twice: directly against a throwaway Postgres, and
# through pgbudget in transaction mode (slice 20, ceiling 200, pin = "allow", [auth] passthrough,
# databases = ["*"]), each run on a fresh copy of the same pristine cluster. Each file runs alone under
# TEST_TIMEOUT, so a hang is one failed file. Upstream's harness (test/suite.js) stops a file at its first
# failing test, so the file is the unit compared; each file's log keeps the per-test lines (`  name ✔`,
# `FAILED!`). Prints per file both runs' status, the files failing only through pgbudget (with their output
# from the failure on), those failing only direct and those failing both ways, and pgbudget's WARN/ERROR lines.
# Extra suites (SUITES): pg-binary (the Makefile's test-binary: the integration files with `binary`, results
# in binary format), and the mocha suites of pg-pool, pg-cursor and pg-query-stream from the same tree, one
# test file per mocha process (spec reporter; a file failing both ways is also compared per test).
#
# The cluster gets what upstream's CI sets up: the role scram_test (password test4scram, SCRAM) for
# test/integration/client/sasl-scram-tests.js (SCRAM_TEST_PGUSER / SCRAM_TEST_PGPASSWORD), PGTESTNOSSL=true, and
# before each run `node script/create-test-tables.js` (the Makefile's test-connection: table person) against the
# direct server. The tests see PGHOST=127.0.0.1, PGPORT (the server's or pgbudget's), PGUSER=postgres,
# PGPASSWORD=secret, PGDATABASE=postgres. The cluster has no TLS, so test/integration/client/ssl-tests.js fails
# both ways (upstream CI's server has a certificate); sasl-scram-tests.js takes 60 s direct (its empty-password
# test leaves a login mid-SASL until Postgres's authentication_timeout), hence TEST_TIMEOUT's 90 s.
#
# The upstream tree (NODE_PG_SRC): node-postgres at tag pg@NODE_PG_VERSION (its packages/pg/{test,script} and,
# for the extra suites, packages/pg-*/test; its yarn.lock). When it is missing it is fetched into CACHE:
# `git clone --depth 1 --branch pg@VERSION` from GitHub where that is reachable, else the upstream tarball of
# Debian's source package node-postgres (`apt-get source --download-only` with apt state of its own under
# CACHE, nothing changed in /etc/apt; its .orig.tar.gz is GitHub's archive of the tag) from the Debian suite
# that has this version (DEBIAN_SUITES; sid has 8.16.3). npm installs into CACHE/node-postgres-VERSION-npm: pg
# at NODE_PG_VERSION, pg-protocol, pg-pool, pg-connection-string, pg-cursor, pg-query-stream at the tree's own
# versions, and pg's dependencies plus the test dependencies (async, co, bluebird, pg-copy-streams, mocha,
# expect.js, lodash, ts-node, typescript, ...) at the versions upstream's yarn.lock resolves their ranges to, as
# CI's `yarn install --frozen-lockfile` does. The tests run in a copy of the tree under a temp dir whose
# packages/pg/lib and pg-pool's / pg-cursor's index.js are the npm packages' (pg-query-stream's tests import
# ../src, kept from the tree), so the published driver is what is tested (for 8.16.3 npm's lib/ is
# byte-identical to the tag's; a difference is reported).
#
# Exit status: 0 when no test fails only through pgbudget, 1 otherwise (or when pgbudget died), 2 when the
# harness itself fails.
#
# Knobs (environment): NODE_PG_VERSION (8.16.3), NODE_PG_SRC (CACHE/node-postgres-VERSION), SUITES ("pg"; all:
# "pg pg-binary pg-pool pg-cursor pg-query-stream"), FILES (an extended regex: only test files whose path
# relative to the package matches, e.g. 'integration/client/(prepared|notice)'), TEST_TIMEOUT (seconds per test
# file, 90), TEST_TIMEOUT_MS (exported to the tests as TEST_TIMEOUT: test-helper's assert.calls timeout, upstream
# default 5000), PGBUDGET_BIN (skip the cargo build), PGBUDGET_LOG (RUST_LOG for pgbudget, "warn"), POOL_MODE, SLICE and PIN (the
# service's pool mode, "transaction", slice, 20, and pin, "allow"), CACHE
# (~/.cache/pgbudget/driver-suites), OUT (target/node-pg-suite: per-file logs, results), DEBIAN_SUITES ("sid
# trixie bookworm"), NODE (node), NPM (npm), KEEP_TMP=1.
set -euo pipefail

NODE_PG_VERSION=${NODE_PG_VERSION:-8.16.3}
SUITES=${SUITES:-pg}
FILES=${FILES:-}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
CACHE=${CACHE:-$HOME/.cache/pgbudget/driver-suites}
NODE_PG_SRC=${NODE_PG_SRC:-$CACHE/node-postgres-$NODE_PG_VERSION}
DEBIAN_SUITES=${DEBIAN_SUITES:-"sid trixie bookworm"}
NODE=${NODE:-node}
NPM=${NPM:-npm}
PASSWORD=secret
PYTHON=python3 # free_port's (not a knob)

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd -- "$REPO_ROOT"
OUT=${OUT:-target/node-pg-suite}
mkdir -p -- "$OUT" "$CACHE"
OUT=$(cd -- "$OUT" && pwd)

# shellcheck source-path=SCRIPTDIR source=suite_lib.sh
source "$SCRIPT_DIR/suite_lib.sh"
for s in $SUITES; do
    case $s in pg | pg-binary | pg-pool | pg-cursor | pg-query-stream) ;;
        *) die "unknown suite '$s' (pg pg-binary pg-pool pg-cursor pg-query-stream)" ;; esac
done

# ---------------------------------------------------------------- tools
find_postgres
command -v "$NODE" >/dev/null || die "$NODE not found"
command -v "$NPM" >/dev/null || die "$NPM not found"
command -v python3 >/dev/null || die "python3 not found (free ports, the summary)"

# ---------------------------------------------------------------- the upstream tree
fetch_debian_source() { # -> the upstream tarball of Debian's node-postgres VERSION+..., extracted to NODE_PG_SRC
    local apt=$CACHE/debian-apt suite ver="" tarball
    local -a opts=(-o "Dir::Etc::SourceParts=$apt/sources" -o Dir::Etc::SourceList=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
    mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/src"
    cat >"$apt/sources/debian-src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $DEBIAN_SUITES
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    log "apt-get update of Debian's source lists ($DEBIAN_SUITES) into $apt"
    apt-get "${opts[@]}" -qq update >&2 || return 1
    ver=$(apt-cache "${opts[@]}" showsrc node-postgres 2>/dev/null |
        awk -v v="$NODE_PG_VERSION" '$1 == "Version:" && index($2, v "+") == 1 { print $2; exit }')
    [[ -n $ver ]] || { log "no Debian source package node-postgres $NODE_PG_VERSION in $DEBIAN_SUITES"; return 1; }
    # Only the upstream tarball is needed; the component tarballs may be missing on a mirror.
    tarball=$apt/src/node-postgres_${ver%-*}.orig.tar.gz
    if [[ ! -s $tarball ]]; then
        log "apt-get source --download-only node-postgres=$ver"
        (cd "$apt/src" && apt-get "${opts[@]}" -o APT::Sandbox::User=root -qq source --download-only \
            "node-postgres=$ver" >"$apt/source.log" 2>&1) || true
    fi
    [[ -s $tarball ]] || { cat "$apt/source.log" >&2; log "apt-get source did not fetch $tarball"; return 1; }
    local top; top=$(tar -tzf "$tarball" | head -n 1); top=${top%%/*}
    rm -rf -- "$NODE_PG_SRC.partial" && mkdir -p -- "$NODE_PG_SRC.partial"
    tar -xzf "$tarball" -C "$NODE_PG_SRC.partial" --strip-components=1 "$top/"
    mv -- "$NODE_PG_SRC.partial" "$NODE_PG_SRC"
}
if [[ ! -d $NODE_PG_SRC/packages/pg/test ]]; then
    [[ ! -e $NODE_PG_SRC ]] || die "NODE_PG_SRC=$NODE_PG_SRC exists but has no packages/pg/test"
    log "no upstream tree at $NODE_PG_SRC: fetching node-postgres pg@$NODE_PG_VERSION"
    if command -v git >/dev/null && timeout 120 git clone -q --depth 1 --branch "pg@$NODE_PG_VERSION" \
        https://github.com/brianc/node-postgres "$NODE_PG_SRC" 2>/dev/null; then
        log "cloned pg@$NODE_PG_VERSION from GitHub"
    else
        rm -rf -- "$NODE_PG_SRC"
        fetch_debian_source || die "cannot fetch node-postgres pg@$NODE_PG_VERSION (GitHub, Debian source)"
    fi
fi
src_version=$("$NODE" -p "require('$NODE_PG_SRC/packages/pg/package.json').version")
[[ $src_version == "$NODE_PG_VERSION" ]] ||
    die "$NODE_PG_SRC/packages/pg/package.json is pg $src_version, not NODE_PG_VERSION=$NODE_PG_VERSION"

# ---------------------------------------------------------------- npm packages
NPM_DIR=$CACHE/node-postgres-$NODE_PG_VERSION-npm
mkdir -p -- "$NPM_DIR"
# The versions the tree names: its own packages at their versions, the rest at what its package.json files ask.
"$NODE" - "$NODE_PG_SRC" >"$NPM_DIR/package.json.new" <<'JS'
const [src] = process.argv.slice(2)
const pkg = (p) => require(`${src}/packages/${p}/package.json`)
const own = ['pg', 'pg-protocol', 'pg-pool', 'pg-connection-string', 'pg-cursor', 'pg-query-stream']
const deps = {}
for (const p of own) deps[p] = pkg(p).version
const want = (p, fields) => {
  for (const f of fields) for (const [n, v] of Object.entries(pkg(p)[f] || {})) if (!(n in deps)) deps[n] = v
}
want('pg', ['dependencies'])
// test devDependencies only (no cloudflare/vitest/typescript tooling for test/cloudflare, not run here)
for (const n of ['async', 'co', 'bluebird', 'pg-copy-streams']) deps[n] = pkg('pg').devDependencies[n]
// every suite's test dependencies, whichever SUITES names, so the cached install stays the same
for (const n of ['mocha', 'expect.js', 'lodash']) deps[n] = deps[n] || pkg('pg-pool').devDependencies[n]
{
  const d = pkg('pg-query-stream').devDependencies
  for (const n of ['ts-node', 'typescript', 'JSONStream', 'concat-stream', 'stream-spec', '@types/chai',
    '@types/mocha', '@types/node', '@types/pg']) deps[n] = deps[n] || d[n]
  deps.chai = deps.chai || pkg('pg-protocol').devDependencies.chai
}
// pinned as upstream CI's `yarn install --frozen-lockfile` pins them: the version yarn.lock resolves name@range to
const lock = {}
let names = []
for (const line of require('fs').readFileSync(`${src}/yarn.lock`, 'utf8').split('\n')) {
  if (/^\S.*:$/.test(line) && !line.startsWith('#')) names = line.slice(0, -1).split(', ').map((n) => n.replace(/^"|"$/g, ''))
  const m = /^  version "(.*)"$/.exec(line)
  if (m) for (const n of names) lock[n] = m[1]
}
for (const [n, r] of Object.entries(deps)) if (!own.includes(n) && lock[`${n}@${r}`]) deps[n] = lock[`${n}@${r}`]
console.log(JSON.stringify({ name: 'pgbudget-node-pg-suite', private: true, dependencies: deps }, null, 2))
JS
if ! cmp -s "$NPM_DIR/package.json.new" "$NPM_DIR/package.json" || [[ ! -f $NPM_DIR/node_modules/.installed ]]; then
    mv -- "$NPM_DIR/package.json.new" "$NPM_DIR/package.json"
    log "npm install into $NPM_DIR (pg $NODE_PG_VERSION and the test dependencies)"
    # no optional dependencies: pg-cloudflare is for Workers; pg-native is an optional peer and never installed
    (cd "$NPM_DIR" && "$NPM" install --no-audit --no-fund --omit=optional --no-package-lock >&2) || die "npm install failed"
    touch "$NPM_DIR/node_modules/.installed"
else
    rm -f -- "$NPM_DIR/package.json.new"
fi
[[ ! -e $NPM_DIR/node_modules/pg-native ]] || die "pg-native is installed in $NPM_DIR; remove it (native tests are not run)"
installed=$("$NODE" -p "require('$NPM_DIR/node_modules/pg/package.json').version")
[[ $installed == "$NODE_PG_VERSION" ]] || die "npm installed pg $installed, not $NODE_PG_VERSION"
if ! diff -rq "$NPM_DIR/node_modules/pg/lib" "$NODE_PG_SRC/packages/pg/lib" >/dev/null 2>&1; then
    log "note: npm's pg $NODE_PG_VERSION lib/ differs from the tree's packages/pg/lib (the npm one is tested)"
fi

build_pgbudget

# ---------------------------------------------------------------- processes
harness_init node-pg-suite TERM # RUN_PID: timeout's pid, it passes the signal on to node
PG_EXTRA_OPTS=()

# ---------------------------------------------------------------- the tree the tests run in
# A copy of the upstream test dirs; the code under test is npm's. node_modules: the npm install.
TREE=$TMP/tree
mkdir -p "$TREE/packages"
ln -s "$NPM_DIR/node_modules" "$TREE/node_modules"
cp -a -- "$NODE_PG_SRC/packages/pg/." "$TREE/packages/pg/"
rm -rf -- "$TREE/packages/pg/lib" "$TREE/packages/pg/esm" "$TREE/packages/pg/node_modules"
cp -a -- "$NPM_DIR/node_modules/pg/lib" "$NPM_DIR/node_modules/pg/esm" "$TREE/packages/pg/"
for s in $SUITES; do
    [[ $s == pg || $s == pg-binary ]] && continue
    mkdir -p "$TREE/packages/$s"
    cp -a -- "$NODE_PG_SRC/packages/$s/test" "$NODE_PG_SRC/packages/$s/package.json" "$TREE/packages/$s/"
    for f in .mocharc.json .mocharc.yml .mocharc.js tsconfig.json; do
        [[ -e $NODE_PG_SRC/packages/$s/$f ]] && cp -a -- "$NODE_PG_SRC/packages/$s/$f" "$TREE/packages/$s/"
    done
    # the package itself from npm: what its tests require('../') (pg-query-stream: its TypeScript test files
    # import ../src, so that stays the tree's, the same source npm's dist is built from)
    case $s in
        pg-pool | pg-cursor) cp -a -- "$NPM_DIR/node_modules/$s/index.js" "$TREE/packages/$s/" ;;
        pg-query-stream) cp -a -- "$NODE_PG_SRC/packages/$s/src" "$TREE/packages/$s/" ;;
    esac
done

pkg_dir() { [[ $1 == pg-binary ]] && echo "$TREE/packages/pg" || echo "$TREE/packages/$1"; }
list_files() { # suite -> test files, relative to its package dir, in the order upstream's runner finds them
    local dir; dir=$(pkg_dir "$1")
    case $1 in
        pg) (cd "$dir" && { find test/unit -name '*-tests.js' | sort; find test/integration -name '*-tests.js' | sort; }) ;;
        pg-binary) (cd "$dir" && find test/integration -name '*-tests.js' | sort) ;;
        pg-pool | pg-cursor) (cd "$dir" && find test -maxdepth 1 -name '*.js' ! -name setup.js | sort) ;;
        pg-query-stream) (cd "$dir" && find test -maxdepth 1 -name '*.ts' ! -name helper.ts | sort) ;;
    esac | { if [[ -n $FILES ]]; then grep -E -- "$FILES" || true; else cat; fi; }
}

test_env() { # port -> env assignments for the tests
    printf '%s\n' PGHOST=127.0.0.1 "PGPORT=$1" PGUSER=postgres "PGPASSWORD=$PASSWORD" PGDATABASE=postgres \
        PGTESTNOSSL=true SCRAM_TEST_PGUSER=scram_test SCRAM_TEST_PGPASSWORD=test4scram
    [[ -n ${TEST_TIMEOUT_MS:-} ]] && printf '%s\n' "TEST_TIMEOUT=$TEST_TIMEOUT_MS"
    return 0
}

run_file() { # suite target port file: one test file, its log and "status rc seconds" into OUT
    local suite=$1 target=$2 port=$3 file=$4 dir rc=0 t0 t1 status
    local base=$OUT/$target/$suite/${file//\//__}
    local -a cmd envs
    dir=$(pkg_dir "$suite")
    mapfile -t envs < <(test_env "$port")
    case $suite in
        pg) cmd=("$NODE" "$file" postgres://) ;;
        pg-binary) cmd=("$NODE" "$file" postgres:// binary) ;; # the Makefile's test-binary
        pg-pool) cmd=("$NODE" "$TREE/node_modules/mocha/bin/mocha.js" --reporter spec --exit --timeout 10000 test/setup.js "$file") ;;
        pg-cursor) cmd=("$NODE" "$TREE/node_modules/mocha/bin/mocha.js" --reporter spec --exit --timeout 10000 "$file") ;;
        pg-query-stream) cmd=("$NODE" "$TREE/node_modules/mocha/bin/mocha.js" --reporter spec --exit --timeout 10000
            -r ts-node/register "$file") ;;
    esac
    [[ $suite == pg-pool && ! -e $dir/test/setup.js ]] && cmd=("${cmd[@]/test\/setup.js/}")
    mkdir -p -- "$(dirname -- "$base")"
    t0=$(date +%s.%N)
    # in the background and waited for, so Ctrl-C / SIGTERM reach the trap; TS_NODE_TRANSPILE_ONLY: no type check
    (cd "$dir" && exec env -u PGSSLMODE -u PGSERVICE -u PGOPTIONS -u PGPASSFILE -u PGSERVICEFILE -u PGAPPNAME \
        -u PGCONNECT_TIMEOUT -u NODE_OPTIONS "${envs[@]}" TS_NODE_TRANSPILE_ONLY=true \
        timeout -k 5 "$TEST_TIMEOUT" "${cmd[@]}") </dev/null >"$base.log" 2>&1 &
    RUN_PID=$!
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
    t1=$(date +%s.%N)
    if (( rc == 0 )); then status=pass; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=fail; fi
    printf '%s\t%s\t%s\t%.1f\n' "$file" "$status" "$rc" "$(echo "$t1 - $t0" | bc)" >>"$OUT/$target/$suite.tsv"
    [[ $status == pass ]] || log "  $suite $file: $status (exit $rc)"
}

# ---------------------------------------------------------------- the pristine cluster every run starts from
init_template
start_pg "$TMP/template" "$TMP/template.log"
# upstream CI: psql -c "SET password_encryption = 'scram-sha-256'" -c "CREATE ROLE scram_test LOGIN PASSWORD 'test4scram'"
psql_at "$PG_PORT" -d postgres -c "SET password_encryption = 'scram-sha-256'" \
    -c "CREATE ROLE scram_test LOGIN PASSWORD 'test4scram'" || { cat "$TMP/template.log" >&2; die "cannot create role scram_test"; }
stop_pg

# ---------------------------------------------------------------- runs
command -v bc >/dev/null || die "bc not found"
rm -rf -- "$OUT/direct" "$OUT/pgbudget"
for target in direct pgbudget; do
    rm -rf -- "$TMP/pgdata" && cp -a -- "$TMP/template" "$TMP/pgdata" # same pristine cluster for each run
    start_pg "$TMP/pgdata" "$OUT/postgres-$target.log"
    port=$PG_PORT
    mkdir -p "$OUT/$target"
    # the Makefile's test-connection step, against the direct server as upstream CI's one server
    (cd "$TREE/packages/pg" && env PGHOST=127.0.0.1 "PGPORT=$PG_PORT" PGUSER=postgres "PGPASSWORD=$PASSWORD" \
        PGDATABASE=postgres timeout 60 "$NODE" script/create-test-tables.js postgres://) >"$OUT/$target/create-test-tables.log" 2>&1 ||
        { cat "$OUT/$target/create-test-tables.log" >&2; die "script/create-test-tables.js failed"; }
    if [[ $target == pgbudget ]]; then
        start_pgbudget "$OUT/pgbudget.log"
        port=$PGBUDGET_PORT
        psql_at "$port" -d postgres -c 'select 1' >/dev/null || die "smoke query through pgbudget failed"
    fi
    t0=$SECONDS
    for suite in $SUITES; do
        mapfile -t files < <(list_files "$suite")
        (( ${#files[@]} )) || { log "$suite: no test files${FILES:+ match FILES=$FILES}"; continue; }
        log "$suite via $target (127.0.0.1:$port): ${#files[@]} test files, logs in $OUT/$target/$suite"
        : >"$OUT/$target/$suite.tsv"
        for f in "${files[@]}"; do
            run_file "$suite" "$target" "$port" "$f"
            if [[ -n $PGBUDGET_PID ]] && ! kill -0 "$PGBUDGET_PID" 2>/dev/null; then
                log "pgbudget died during $f!"; echo "pgbudget died during $suite $f" >>"$OUT/$target/died"
                break 2
            fi
        done
    done
    log "$target: $(( SECONDS - t0 )) s"
    stop_pgbudget
    stop_pg
done

# ---------------------------------------------------------------- summary
# shellcheck disable=SC2086 # SUITES is a word list
python3 - "$OUT" "$TEST_TIMEOUT" $SUITES <<'PY'
import os, re, sys
out, timeout, suites = sys.argv[1], sys.argv[2], sys.argv[3:]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

def load(target, suite):
    """{file: (status, rc, secs)} or None when that run did not happen."""
    p = os.path.join(out, target, suite + ".tsv")
    if not os.path.exists(p):
        return None
    res = {}
    for line in open(p):
        f, st, rc, secs = line.rstrip("\n").split("\t")
        res[f] = (st, rc, secs)
    return res

def logtext(target, suite, f):
    p = os.path.join(out, target, suite, f.replace("/", "__") + ".log")
    return ANSI.sub("", open(p, errors="replace").read()) if os.path.exists(p) else ""

def mocha_tests(text):
    """mocha's spec reporter: {title: 'pass'|'fail'} from its '✔ title' / 'N) title' lines (nesting flattened)."""
    res = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(?:✔|✓)\s+(.*?)(?:\s+\(\d+ms\))?$", line)
        if m:
            res[m.group(1)] = "pass"
            continue
        m = re.match(r"^\s+\d+\) (.*)$", line)
        if m and m.group(1) not in res:
            res[m.group(1)] = "fail"
    return res

def excerpt(text, n=25):
    """The failing part of a log: from upstream suite.js' 'FAILED!' (or mocha's failures, or an uncaught error) on."""
    lines = [l for l in text.splitlines() if l.strip()]
    for key in ("FAILED!", "  failing", "Error", "AssertionError"):
        idx = [i for i, l in enumerate(lines) if key in l]
        if idx:
            start = max(0, idx[0] - (1 if key == "FAILED!" else 2))
            return lines[start:start + n]
    return lines[-n:]

rc, proxy_fail = 0, False
for suite in suites:
    d, p = load("direct", suite), load("pgbudget", suite)
    if d is None or p is None:
        print(f"\n{suite}: run missing (direct: {d is not None}, pgbudget: {p is not None})"); proxy_fail = True; continue
    files = list(dict.fromkeys(list(d) + list(p)))
    cnt = lambda r: {k: sum(1 for v in r.values() if v[0] == k) for k in ("pass", "fail", "timeout")}
    cd, cp = cnt(d), cnt(p)
    print(f"\n== {suite}: {len(files)} test files")
    print(f"   direct:   {cd['pass']} passed, {cd['fail']} failed, {cd['timeout']} timed out")
    print(f"   pgbudget: {cp['pass']} passed, {cp['fail']} failed, {cp['timeout']} timed out"
          + ("" if len(p) == len(files) else f" ({len(files) - len(p)} not run)"))
    w = max(len(f) for f in files)
    print(f"\n   {'file'.ljust(w)}  direct          pgbudget")
    for f in files:
        sd = d.get(f, ("-", "", ""))
        sp = p.get(f, ("-", "", ""))
        fmt = lambda s: (f"{s[0]} ({s[2]} s)" if s[0] != "-" else "not run").ljust(14)
        mark = "  <== proxy only" if sd[0] == "pass" and sp[0] != "pass" else ("  (direct only)" if sp[0] == "pass" and sd[0] != "pass" else "")
        print(f"   {f.ljust(w)}  {fmt(sd)}  {fmt(sp)}{mark}")
    only_p = [f for f in files if d.get(f, ("-",))[0] == "pass" and p.get(f, ("-",))[0] != "pass"]
    only_d = [f for f in files if p.get(f, ("-",))[0] == "pass" and d.get(f, ("-",))[0] != "pass"]
    both = [f for f in files if d.get(f, ("-",))[0] not in ("pass", "-") and p.get(f, ("-",))[0] not in ("pass", "-")]
    proxy_fail |= bool(only_p) or len(p) < len(files)
    # per test for mocha suites: tests failing only through pgbudget inside files failing both ways
    if suite not in ("pg", "pg-binary"):
        for f in both:
            td, tp = mocha_tests(logtext("direct", suite, f)), mocha_tests(logtext("pgbudget", suite, f))
            extra = [t for t, s in tp.items() if s == "fail" and td.get(t) == "pass"]
            if extra:
                only_p.append(f); proxy_fail = True
                print(f"   {f}: fails both ways, but these tests only through pgbudget: {extra}")
    print(f"\n{suite}: {len(only_p)} test file(s) fail only through pgbudget")
    for f in only_p:
        st = p.get(f, ("not run", "", ""))
        print(f"\n  --- {f}: {st[0]} (exit {st[1]}, {st[2]} s); its output from the failure on:")
        print("\n".join("    " + l[:240] for l in excerpt(logtext("pgbudget", suite, f))))
    print(f"\n{suite}: {len(only_d)} test file(s) fail only direct" + (": " + ", ".join(only_d) if only_d else ""))
    print(f"{suite}: {len(both)} test file(s) fail both ways" + (": " + ", ".join(both) if both else ""))
for t in ("direct", "pgbudget"):
    died = os.path.join(out, t, "died")
    if os.path.exists(died):
        print("note: " + open(died).read().strip()); proxy_fail = True
plog = os.path.join(out, "pgbudget.log")
if os.path.exists(plog):
    warn = [ANSI.sub("", l.rstrip()) for l in open(plog, errors="replace") if " WARN " in l or " ERROR " in l]
    print(f"\npgbudget logged {len(warn)} WARN/ERROR line(s)" + (", the last ones:" if warn else ""))
    print("\n".join("  " + l[:300] for l in warn[-15:]))
print(f"\n(per-file timeout {timeout} s; per-file logs in {out}/direct and {out}/pgbudget; pgbudget's log {out}/pgbudget.log)")
sys.exit(1 if proxy_fail else 0)
PY
