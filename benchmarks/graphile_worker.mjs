// A Graphile Worker process for peers.py: the same start gate as benchmarks/peer_workers.py.
//
//   node graphile_worker.mjs migrate --modules DIR --connection JSON
//   node graphile_worker.mjs work --modules DIR --connection JSON [--concurrency N]
//       [--max-pool-size N] [--local-queue N] [--complete-batch-delay MS]
//       [--fail-batch-delay MS] [--poll-interval MS] [--no-prepared-statements]
//
// `migrate` installs or upgrades the graphile_worker schema and exits. `work` opens its
// pool, prints READY, waits for a line on stdin (so start-up is outside the timing), then
// runs a no-op task until SIGTERM. DIR is the node_modules that peers.py installed (outside
// git), JSON the node-postgres connection options. Logs below warning are dropped: Graphile
// logs one info line per completed job, which would make this a benchmark of logging.

import { createRequire } from "node:module";
import path from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    modules: { type: "string" },
    connection: { type: "string" },
    concurrency: { type: "string", default: "24" },
    "max-pool-size": { type: "string", default: "25" },
    "local-queue": { type: "string", default: "-1" },
    "complete-batch-delay": { type: "string", default: "-1" },
    "fail-batch-delay": { type: "string", default: "-1" },
    "poll-interval": { type: "string", default: "2000" },
    "no-prepared-statements": { type: "boolean", default: false },
  },
});
const command = positionals[0];
if (!values.modules || !values.connection || !["migrate", "work"].includes(command)) {
  process.stderr.write("usage: graphile_worker.mjs migrate|work --modules DIR --connection JSON\n");
  process.exit(2);
}

// Resolve the packages from the cache directory, not from this file's location.
const require = createRequire(path.join(values.modules, "noop.js"));
const pg = require("pg");
const worker = await import(pathToFileURL(require.resolve("graphile-worker")).href);

const logger = new worker.Logger(() => (level, message) => {
  if (level === "error" || level === "warning") process.stderr.write(`${level}: ${message}\n`);
});

const int = (name) => Number.parseInt(values[name], 10);
const maxPoolSize = int("max-pool-size");
const pgPool = new pg.Pool({ ...JSON.parse(values.connection), max: maxPoolSize });
// An idle client's error must not crash the process (Graphile warns without both handlers).
pgPool.on("error", (error) => process.stderr.write(`pool error: ${error}\n`));
pgPool.on("connect", (client) => {
  client.on("error", (error) => process.stderr.write(`client error: ${error}\n`));
});
const localQueueSize = int("local-queue");
const preset = {
  worker: {
    concurrentJobs: int("concurrency"),
    maxPoolSize,
    pollInterval: int("poll-interval"),
    preparedStatements: !values["no-prepared-statements"],
    completeJobBatchDelay: int("complete-batch-delay"),
    failJobBatchDelay: int("fail-batch-delay"),
    ...(localQueueSize > 0 ? { localQueue: { size: localQueueSize } } : {}),
  },
};

if (command === "migrate") {
  await worker.runMigrations({ pgPool, logger, preset });
  await pgPool.end();
  process.exit(0);
}

// Connect once before the gate, as the Python workers open their pools before theirs.
(await pgPool.connect()).release();
let ran = 0;
const taskList = {
  noop: async () => {
    ran += 1;
  },
};
process.stdout.write("READY\n");
const lines = createInterface({ input: process.stdin });
await new Promise((resolve) => lines.once("line", resolve));
lines.close();

const runner = await worker.run({ pgPool, logger, preset, taskList, noHandleSignals: true });
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await runner.stop();
  await pgPool.end();
  process.stderr.write(`ran ${ran} jobs\n`);
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
await runner.promise;
