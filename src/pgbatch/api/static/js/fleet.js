// The fleet: the strip under the top bar (live workers, slots in use, queues with their
// depth, oldest wait and paused state), and why an unfinished batch waits: its queue is
// paused, or no live worker serves its queue and task. One poller for the whole page
// (GET /v1/workers and /v1/queues): workers refresh their registry row every few
// seconds, so reading it more often would show nothing new.

import { request } from "./api.js";
import { h, setText } from "./dom.js";

const FLEET_POLL_MS = 3000;

let snapshot = null; // {workers, queues, at}: the last answer of both endpoints
const listeners = new Set();
let timer = null;

async function poll() {
  try {
    const [workers, queues] = await Promise.all([request("v1/workers"), request("v1/queues")]);
    snapshot = { workers: workers.data, queues: queues.data.queues, at: Date.now() };
  } catch {
    // No token yet, or the API is away: the page's own views say so; keep the last view.
  }
  for (const listener of listeners) listener(snapshot);
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    await poll();
    schedule();
  }, FLEET_POLL_MS);
}

/** Call `listener(snapshot)` after every fleet read; return a function that stops it. */
export function onFleet(listener) {
  listeners.add(listener);
  if (snapshot) listener(snapshot);
  return () => listeners.delete(listener);
}

/** Read the fleet now (after a pause or resume, say), then every few seconds. */
export async function refreshFleet() {
  await poll();
  schedule();
}

/** Return why `batch` waits ("queue_paused", "no_live_worker") or null. */
export function waitingReason(batch) {
  if (!batch || batch.is_final) return null;
  if (!snapshot) return batch.waiting_reason ?? null;
  const queue = snapshot.queues.find((q) => q.name === batch.queue);
  if (queue?.paused) return "queue_paused";
  const served = snapshot.workers.workers.some(
    (w) => !w.expired && w.queues.includes(batch.queue) && w.tasks.includes(batch.task),
  );
  return served ? null : "no_live_worker";
}

/** Return the short label of a waiting reason, for a table cell. */
export function waitingLabel(reason) {
  return reason === "queue_paused" ? "queue paused" : "no live worker";
}

/** Return the sentence that says why `batch` waits and what to do. */
export function waitingSentence(reason, batch) {
  if (reason === "queue_paused") {
    return `Queue “${batch.queue}” is paused: nothing new is claimed until it is resumed (pgbatch queue resume ${batch.queue}).`;
  }
  return `No live worker serves task “${batch.task}” on queue “${batch.queue}”: nothing will run this batch until one starts (pgbatch worker --app …).`;
}

function age(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function queueChip(queue) {
  const parts = [`${queue.queued_shards} queued`];
  if (queue.queued_shards) parts.push(`oldest ${age(queue.oldest_queued_s)}`);
  if (queue.running_shards) parts.push(`${queue.running_shards} running`);
  return h(
    "span",
    {
      class: "fleet-queue",
      "data-testid": "fleet-queue",
      "data-queue": queue.name,
      "data-paused": String(queue.paused),
      title: queue.paused ? "Paused: workers claim nothing from it; running shards finish." : "",
    },
    h("strong", {}, queue.name),
    queue.paused ? h("span", { class: "fleet-paused", "data-testid": "fleet-paused" }, "paused") : null,
    h("span", { class: "muted" }, parts.join(" · ")),
  );
}

/** Fill the strip `root` and keep it current; return a function that stops it. */
export function mountFleetStrip(root) {
  const workersText = h("span", { "data-testid": "fleet-workers" });
  const queuesBox = h("span", { class: "fleet-queues", "data-testid": "fleet-queues" });
  root.replaceChildren(h("span", { class: "fleet-label" }, "Workers"), workersText, queuesBox);
  const stop = onFleet((fleet) => {
    if (!fleet) return;
    root.hidden = false;
    const { live, slots, slots_in_use: used, workers } = fleet.workers;
    const expired = workers.length - live;
    const text = live
      ? `${live} live · ${used}/${slots} slots in use${expired ? ` · ${expired} expired` : ""}`
      : `none live${expired ? ` (${expired} expired)` : ""}: queued work waits`;
    setText(workersText, text);
    root.dataset.live = String(live);
    root.title = workers
      .map((w) => `${w.id}: ${w.expired ? "expired" : "live"}, ${w.slots_in_use}/${w.concurrency} slots, ${w.tasks.join(", ")} on ${w.queues.join(", ")}, v${w.version}`)
      .join("\n");
    queuesBox.replaceChildren(...fleet.queues.map(queueChip));
  });
  refreshFleet();
  return () => {
    stop();
  };
}
