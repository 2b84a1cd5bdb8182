// The pieces both pages show: status badges, progress bars, counts, durations and the
// live speed of a batch.

import { h, setText } from "./dom.js";

const integer = new Intl.NumberFormat();
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const STATUS_LABELS = {
  pending: "Pending",
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};
// Speed is measured over the snapshots of this many last milliseconds.
const RATE_WINDOW_MS = 10000;
// With no snapshot for this long, a running batch's speed decays towards zero: a
// stalled batch must not keep showing its last good speed.
const RATE_STALE_MS = 2000;

/** Format a count with the reader's digit grouping. */
export function count(n) {
  return integer.format(n);
}

/**
 * Return the items that ran (succeeded or failed): a cancellation ends items without
 * running them, so it is neither progress nor throughput.
 */
export function itemsRan(batch) {
  return batch.items_ok + batch.items_failed;
}

/** Return the whole percentage of items that ran (100 only when every item ran). */
export function percentDone(batch) {
  if (batch.total_items === 0) return batch.is_final ? 100 : 0;
  return Math.floor((itemsRan(batch) * 100) / batch.total_items);
}

/** Return "x of n" for the batch's items that ran. */
export function itemsOf(batch) {
  return `${count(itemsRan(batch))} of ${count(batch.total_items)}`;
}

export function statusLabel(status) {
  return STATUS_LABELS[status] ?? status;
}

/** Tell whether a batch is cancelled but its running shards have not stopped yet. */
export function isStopping(batch) {
  return batch.status === "cancelled" && !batch.is_final;
}

/** A status badge; `setBadge` updates it. */
export function badge(batch) {
  const node = h("span", { class: "badge", "data-testid": "status-badge" });
  if (batch) setBadge(node, batch);
  return node;
}

/** Show the batch's status; a cancelled batch still stopping reads "Cancelling…". */
export function setBadge(node, batch) {
  const label = isStopping(batch) ? "Cancelling…" : statusLabel(batch.status);
  if (node.dataset.status === batch.status && node.textContent === label) return;
  node.dataset.status = batch.status;
  node.replaceChildren(h("span", { class: "badge-dot", "aria-hidden": "true" }), label);
}

/** Return "n failed". */
export function failedText(batch) {
  return `${count(batch.items_failed)} failed`;
}

/** Return "n cancelled" (items a cancellation ended; the API counts them apart). */
export function cancelledText(batch) {
  return `${count(batch.items_cancelled ?? 0)} cancelled`;
}

/** Return "1 item", "3 items": `count` with the noun in the right number. */
export function plural(n, noun) {
  return `${count(n)} ${n === 1 ? noun : `${noun}s`}`;
}

/**
 * A progress bar (role=progressbar, aria-valuenow = whole percent of items done): the
 * succeeded items fill it in green, the failed ones in red after them.
 */
export class ProgressBar {
  constructor(label, { large = false } = {}) {
    this.ok = h("span", { class: "bar-ok" });
    this.failed = h("span", { class: "bar-failed" });
    this.cancelled = h("span", { class: "bar-cancelled" });
    this.el = h(
      "div",
      {
        class: large ? "bar bar-large" : "bar",
        role: "progressbar",
        "aria-label": label,
        "aria-valuemin": 0,
        "aria-valuemax": 100,
        "aria-valuenow": 0,
        "data-testid": "progress",
      },
      this.ok,
      this.failed,
      this.cancelled,
    );
  }

  set(batch) {
    const pct = percentDone(batch);
    const total = Math.max(batch.total_items, 1);
    const el = this.el;
    el.setAttribute("aria-valuenow", pct);
    const failed = batch.items_failed ? `, ${failedText(batch)}` : "";
    const cancelled = batch.items_cancelled ? `, ${cancelledText(batch)}` : "";
    el.setAttribute("aria-valuetext", `${itemsOf(batch)} items done (${pct}%)${failed}${cancelled}`);
    el.dataset.status = batch.status;
    const okShare = batch.total_items === 0 && batch.is_final ? 100 : (batch.items_ok * 100) / total;
    this.ok.style.width = `${okShare}%`;
    this.failed.style.width = `${(batch.items_failed * 100) / total}%`;
    this.cancelled.style.width = `${((batch.items_cancelled ?? 0) * 100) / total}%`;
  }
}

/** Format seconds as "< 0.1 s", "0.8 s", "42 s", "3 min 5 s", "2 h 10 min" or "3 d 4 h". */
export function duration(seconds) {
  const s = Math.max(0, seconds);
  if (s < 0.1) return "< 0.1 s";
  if (s < 10) return `${decimal.format(s)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** Format a past instant relative to now: "just now", "5 min ago", a date after a week. */
export function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  if (seconds < 7 * 86400) return `${Math.floor(seconds / 86400)} d ago`;
  return new Date(iso).toLocaleDateString();
}

/** A <time> showing `ago(iso)`, with the exact instant as its tooltip. */
export function timeAgo(iso) {
  const node = h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, ago(iso));
  return node;
}

/** Refresh every timeAgo() under `root`. */
export function refreshTimes(root) {
  for (const node of root.querySelectorAll("time[datetime]")) {
    setText(node, ago(node.getAttribute("datetime")));
  }
}

/** Format items per second. */
export function rate(perSecond) {
  return `${decimal.format(perSecond)}/s`;
}

/**
 * Return the seconds since the batch was submitted, until it ended or now. (The API's
 * `started_at` is its first claim, so it would hide the wait in the queue before.)
 */
export function elapsed(batch) {
  const end = batch.finished_at ? Date.parse(batch.finished_at) : Date.now();
  return (end - Date.parse(batch.created_at)) / 1000;
}

/**
 * Return "waited 2 s · ran 1 min 5 s": the time in the queue (submit to first claim)
 * apart from the time running (first claim to the end, or to now).
 */
export function tookText(batch) {
  if (batch.waiting_s === null || batch.waiting_s === undefined) {
    return batch.is_final ? `took ${duration(elapsed(batch))}` : `waiting ${duration(elapsed(batch))}`;
  }
  const waited = `waited ${duration(batch.waiting_s)}`;
  if (batch.running_s !== null && batch.running_s !== undefined) return `${waited} · ran ${duration(batch.running_s)}`;
  const running = (Date.now() - Date.parse(batch.started_at)) / 1000;
  return `${waited} · running ${duration(running)}`;
}

/**
 * Items per second of each batch, from the snapshots its event stream delivered:
 * measured in the browser, so the page needs no extra request for it.
 */
export class RateMeter {
  #samples = new Map();

  record(batch) {
    const now = performance.now();
    let samples = this.#samples.get(batch.id);
    // A retry (new version, fewer items done) starts a new measurement.
    // Items that ran, not items_done: a cancel ends thousands at once, which is no speed.
    const done = itemsRan(batch);
    if (!samples || samples.at(-1).done > done) samples = [];
    samples.push({ at: now, done });
    while (samples.length > 2 && now - samples[1].at > RATE_WINDOW_MS) samples.shift();
    this.#samples.set(batch.id, samples);
  }

  /** Return items per second now, or null when there is not enough to say. */
  perSecond(batch) {
    if (batch.status !== "running") return null;
    const samples = this.#samples.get(batch.id);
    if (!samples || samples.length < 2) return null;
    const first = samples[0];
    const last = samples.at(-1);
    const until = Math.max(last.at, performance.now() - RATE_STALE_MS);
    const seconds = (until - first.at) / 1000;
    if (seconds < 0.5 || last.done === first.done) return seconds >= 0.5 ? 0 : null;
    return (last.done - first.done) / seconds;
  }

  /** Return "12/s · ~40 s left", "running 3 s", "stopping…" or "waited 1 s · ran 2 s". */
  describe(batch) {
    const spent = duration(elapsed(batch));
    if (batch.is_final) return tookText(batch);
    if (isStopping(batch)) return "stopping…";
    if (batch.status === "pending") return `waiting ${spent}`;
    const speed = this.perSecond(batch);
    if (speed) {
      const left = (batch.total_items - itemsRan(batch)) / speed;
      return `${rate(speed)} · ~${duration(left)} left`;
    }
    // Running since the first claim: the wait in the queue before it is not running time.
    const since = batch.started_at ? duration((Date.now() - Date.parse(batch.started_at)) / 1000) : spent;
    return speed === 0 ? `0/s · running ${since}` : `running ${since}`;
  }

  forget(batchId) {
    this.#samples.delete(batchId);
  }
}
