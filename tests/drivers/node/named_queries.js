// node-postgres named queries through pgbudget in transaction mode (run by tests/drivers.rs).
//
// CLIENTS `pg.Client`s share SHARE server connections. Each runs two named queries (q_sum, q_echo: the same
// names in every client, so the server-side statements of different clients collide unless the proxy keeps
// them apart) ROUNDS times; every 10th round runs inside BEGIN/COMMIT. node-postgres sends Parse for a name
// only once per client connection and Bind/Execute afterwards. Every result is checked; the distinct server
// backends seen (pg_backend_pid()) must number at most SHARE.
'use strict';

const { Client } = require('pg');

const env = (k, d) => process.env[k] || d;
const PROXY_DSN = env('PROXY_DSN');
const DIRECT_DSN = env('DIRECT_DSN');
if (!PROXY_DSN || !DIRECT_DSN) {
  console.error('PROXY_DSN and DIRECT_DSN must be set (postgres:// URLs); this script is run by tests/drivers.rs');
  process.exit(2);
}
const CLIENTS = Number(env('CLIENTS', '20'));
const ROUNDS = Number(env('ROUNDS', '50'));
const SHARE = Number(env('SHARE', '3'));
const SCENARIO = 'node_pg_named_queries';

const failures = [];
const errors = new Map();
const pids = new Set();
let queries = 0;

function fail(where, msg) {
  const line = `FAIL [${where}] ${msg}`;
  console.error(line);
  failures.push(line);
}

function expect(cond, where, what, got) {
  if (!cond) throw new Error(`${where}: ${what}: got ${JSON.stringify(got)}`);
}

function kind(e) {
  const code = e.code || '-';
  const msg = String(e.message || e).split('\n')[0];
  return `${e.constructor.name} ${code}: ${msg}`;
}

async function worker(i) {
  const c = new Client({ connectionString: PROXY_DSN, connectionTimeoutMillis: 10000, query_timeout: 30000 });
  await c.connect();
  try {
    for (let j = 0; j < ROUNDS; j++) {
      const inTx = j % 10 === 9;
      if (inTx) await c.query('BEGIN');
      const a = await c.query({ name: 'q_sum', text: 'SELECT $1::int + $2::int AS s', values: [i, j] });
      expect(a.rows.length === 1 && a.rows[0].s === i + j, `client ${i} round ${j}`, 'q_sum', a.rows);
      const b = await c.query({
        name: 'q_echo',
        text: "SELECT $1::text || '-' || $2::int AS e, pg_backend_pid() AS pid",
        values: [`c${i}`, j],
      });
      expect(b.rows.length === 1 && b.rows[0].e === `c${i}-${j}`, `client ${i} round ${j}`, 'q_echo', b.rows);
      pids.add(b.rows[0].pid);
      if (inTx) await c.query('COMMIT');
      queries += inTx ? 4 : 2;
    }
  } finally {
    await c.end();
  }
}

async function main() {
  const t0 = Date.now();
  const results = await Promise.allSettled(Array.from({ length: CLIENTS }, (_, i) => worker(i)));
  const elapsed = (Date.now() - t0) / 1000;
  results.forEach((r, i) => {
    if (r.status === 'rejected') {
      const k = kind(r.reason);
      errors.set(k, (errors.get(k) || 0) + 1);
      if (i < 5) console.error(`client ${i}: ${k}`);
    }
  });
  for (const [k, n] of [...errors.entries()].sort((x, y) => y[1] - x[1])) {
    fail('clients', `${n} of ${CLIENTS} clients failed with ${k}`);
  }
  if (pids.size > SHARE) fail('budget', `queries ran on ${pids.size} distinct server backends, share is ${SHARE}`);

  const direct = new Client({ connectionString: DIRECT_DSN });
  await direct.connect();
  const left = await direct.query(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
  );
  await direct.end();
  if (left.rows[0].n > SHARE) fail('budget', `${left.rows[0].n} server connections after the load, share is ${SHARE}`);

  const summary =
    `${CLIENTS} clients x ${ROUNDS} rounds, ${queries} statements in ${elapsed.toFixed(1)} s, ` +
    `${pids.size} distinct server backends of share ${SHARE}, ${[...errors.values()].reduce((a, b) => a + b, 0)} failed clients`;
  if (failures.length) {
    console.error(`${SCENARIO}: ${failures.length} failed check(s):`);
    for (const f of failures) console.error('  ' + f);
    console.log(`${SCENARIO}: FAILED (${summary})`);
    process.exit(1);
  }
  console.log(`${SCENARIO}: ok (${summary})`);
}

const deadline = setTimeout(() => {
  console.error(`${SCENARIO}: FAILED (scenario did not finish within 60 s)`);
  process.exit(1);
}, Number(env('SCENARIO_TIMEOUT_S', '60')) * 1000);
main()
  .then(() => {
    clearTimeout(deadline);
  })
  .catch((e) => {
    console.error(`${SCENARIO}: FAILED (${kind(e)})`);
    process.exit(1);
  });
