// The list page: the tenant's batches, newest first, each row kept current by the
// tenant-wide event stream (GET /v1/events). The page is read once per stream opening;
// after that only events change it, and a new batch appears when its first event does.

import { LiveStream, isNewer, request } from "./api.js";
import {
  ProgressBar,
  RateMeter,
  badge,
  cancelledText,
  count,
  failedText,
  itemsOf,
  percentDone,
  rate,
  refreshTimes,
  setBadge,
  statusLabel,
  timeAgo,
} from "./components.js";
import { h, setText } from "./dom.js";
import { waitingLabel, waitingReason } from "./fleet.js";
import { batchLabel, labelFilterInputs, labelsMatch, readLabelFilter, writeLabelFilter } from "./labels.js";

const PAGE_SIZE = 50;
const MAX_PAGE = 500; // the API's largest `limit`
const STATUSES = ["running", "pending", "succeeded", "failed", "cancelled"];
// Speeds, "x ago" and waiting times are redrawn this often (from memory, no request).
const TICK_MS = 1000;
// Typing in the task filter waits this long for a pause before asking the API.
const TYPING_PAUSE_MS = 300;

/** One batch's row; `update` takes a newer snapshot and changes only what moved. */
class Row {
  constructor(batch, meter) {
    this.batch = null;
    this.meter = meter;
    this.badge = badge();
    this.bar = new ProgressBar(`Batch ${batch.id} progress`);
    this.percent = h("span", { class: "pct", "aria-hidden": "true" });
    this.counts = h("span", { "data-testid": "counts" });
    this.failed = h("span", { class: "failed-count" });
    this.cancelled = h("span", { class: "cancelled-count", "data-testid": "cancelled-count" });
    this.pace = h("td", { class: "pace" });
    const href = `#/batches/${batch.id}`;
    this.el = h(
      "tr",
      {
        "data-testid": "batch-row",
        "data-batch-id": batch.id,
        onclick: (event) => {
          // The link does it for keyboards; the whole row is a target for pointers.
          if (event.target.closest("a, button") || getSelection().toString()) return;
          location.hash = href;
        },
      },
      h("th", { scope: "row" }, h("a", { href, "data-testid": "batch-link" }, `#${batch.id}`)),
      h("td", { class: "task" }, batchLabel(batch)),
      h("td", { class: "status-cell" }, this.badge),
      h("td", { class: "progress-cell" }, h("div", { class: "progress-line" }, this.bar.el, this.percent)),
      h("td", { class: "num items" }, this.counts, this.failed, this.cancelled),
      this.pace,
      h("td", { class: "created" }, timeAgo(batch.created_at)),
    );
    this.update(batch);
  }

  update(batch) {
    if (!isNewer(batch, this.batch)) return;
    this.batch = batch;
    this.meter.record(batch);
    this.el.dataset.status = batch.status;
    setBadge(this.badge, batch);
    this.bar.set(batch);
    setText(this.percent, `${percentDone(batch)}%`);
    setText(this.counts, itemsOf(batch));
    setText(this.failed, batch.items_failed ? failedText(batch) : "");
    setText(this.cancelled, batch.items_cancelled ? cancelledText(batch) : "");
    this.tick();
  }

  tick() {
    // A batch nothing will run says so, instead of "waiting 5 min" (fleet.js).
    const reason = waitingReason(this.batch);
    this.pace.dataset.waiting = reason ?? "";
    setText(this.pace, reason ? `${waitingLabel(reason)} · ${this.meter.describe(this.batch)}` : this.meter.describe(this.batch));
  }
}

/** Show the list in `root`; return {heading, unmount}. `query` holds the filters. */
export function mountList(root, query, ctx) {
  const filter = { status: query.get("status") ?? "", task: query.get("task") ?? "", ...readLabelFilter(query) };
  if (!STATUSES.includes(filter.status)) filter.status = "";
  const meter = new RateMeter();
  const rows = new Map();
  const early = new Map(); // snapshots that arrived before the page was read
  let loaded = false;
  let nextCursor = null;
  let generation = 0; // bumps when the filters change: older answers are dropped
  let typing = null;

  const heading = h("h1", { tabindex: -1 }, "Batches");
  const summary = h("p", { class: "summary", "data-testid": "summary", "aria-live": "off" });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "batches", "data-testid": "batch-list" },
    h("caption", { class: "sr-only" }, "Batches, newest first, updated live"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Batch", "Task", "Status", "Progress", "Items", "Pace", "Created"].map((name) =>
          h("th", { scope: "col", class: `col-${name.toLowerCase()}` }, name),
        ),
      ),
    ),
    tbody,
  );
  const empty = h("div", { class: "empty", "data-testid": "empty", hidden: true });
  const moreButton = h(
    "button",
    { type: "button", class: "btn", "data-testid": "load-more", hidden: true, onclick: () => more().catch(ctx.fail) },
    "Show older batches",
  );
  const statusTabs = h(
    "fieldset",
    { class: "segmented" },
    h("legend", { class: "sr-only" }, "Status"),
    ["", ...STATUSES].map((status) =>
      h(
        "label",
        {},
        h("input", {
          type: "radio",
          name: "status",
          value: status,
          checked: status === filter.status,
          "data-testid": `filter-${status || "all"}`,
          onchange: () => setFilter({ status }),
        }),
        h("span", {}, status ? statusLabel(status) : "All"),
      ),
    ),
  );
  const taskInput = h("input", {
    id: "task-filter",
    type: "search",
    placeholder: "exact name",
    value: filter.task,
    autocomplete: "off",
    "data-testid": "filter-task",
    oninput: () => {
      clearTimeout(typing);
      typing = setTimeout(() => setFilter({ task: taskInput.value.trim() }), TYPING_PAUSE_MS);
    },
  });
  const labelInputs = labelFilterInputs(filter, (change) => setFilter(change), TYPING_PAUSE_MS);
  const view = h(
    "section",
    { class: "view list-view", "data-testid": "list-view", "data-loaded": "false" },
    h("div", { class: "view-head" }, h("div", {}, heading, summary)),
    h(
      "form",
      { class: "filters", role: "search", onsubmit: (event) => event.preventDefault() },
      statusTabs,
      h("label", { class: "task-filter", for: "task-filter" }, h("span", {}, "Task"), taskInput),
      labelInputs.nodes,
    ),
    h("div", { class: "card table-card" }, table, empty),
    h("div", { class: "more" }, moreButton),
  );
  root.append(view);
  document.title = "Batches · pgbatch";

  function matches(batch) {
    return (
      (!filter.status || batch.status === filter.status) &&
      (!filter.task || batch.task === filter.task) &&
      labelsMatch(batch, filter)
    );
  }

  function oldestId() {
    let oldest = Infinity;
    for (const id of rows.keys()) oldest = Math.min(oldest, id);
    return oldest;
  }

  /** Show a snapshot: `live` from the stream, else from a page the API gave. */
  function upsert(batch, { live }) {
    const row = rows.get(batch.id);
    if (row) {
      row.update(batch);
      return;
    }
    // From the stream, a batch that stops matching keeps its row until the next read,
    // and a new one is only shown when it matches and is not on a page not loaded yet.
    if (live && (!matches(batch) || (nextCursor !== null && batch.id < oldestId()))) return;
    const added = new Row(batch, meter);
    rows.set(batch.id, added);
    const after = [...tbody.children].find((tr) => Number(tr.dataset.batchId) < batch.id);
    tbody.insertBefore(added.el, after ?? null);
    if (live) added.el.classList.add("row-new");
  }

  function redraw() {
    const byStatus = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    let speed = 0;
    for (const row of rows.values()) {
      byStatus[row.batch.status] += 1;
      if (!row.batch.is_final) row.tick();
      speed += meter.perSecond(row.batch) ?? 0;
    }
    refreshTimes(tbody);
    const parts = [`${count(rows.size)} ${rows.size === 1 ? "batch" : "batches"} shown`];
    for (const status of ["running", "pending", "failed"]) {
      if (byStatus[status]) parts.push(`${count(byStatus[status])} ${status}`);
    }
    if (speed > 0) parts.push(`${rate(speed)} overall`);
    setText(summary, parts.join(" · "));
    document.title = byStatus.running ? `(${byStatus.running}) Batches · pgbatch` : "Batches · pgbatch";
    empty.hidden = !loaded || rows.size > 0;
    table.hidden = loaded && rows.size === 0;
    moreButton.hidden = nextCursor === null;
  }

  function listUrl(limit, cursor) {
    const params = new URLSearchParams({ limit: String(limit) });
    if (filter.status) params.set("status", filter.status);
    if (filter.task) params.set("task", filter.task);
    writeLabelFilter(params, filter);
    if (cursor) params.set("cursor", cursor);
    return `v1/batches?${params}`;
  }

  /** Read the first page again (as many rows as are shown): on every stream opening. */
  async function load() {
    const mine = generation;
    const limit = Math.min(Math.max(PAGE_SIZE, rows.size), MAX_PAGE);
    const { data } = await request(listUrl(limit));
    if (mine !== generation) return;
    nextCursor = data.next_cursor;
    for (const batch of data.batches) upsert(batch, { live: false });
    loaded = true;
    for (const batch of early.values()) upsert(batch, { live: true });
    early.clear();
    view.dataset.loaded = "true";
    ctx.clearBanner();
    showEmpty();
    redraw();
  }

  async function more() {
    const mine = generation;
    moreButton.disabled = true;
    try {
      const { data } = await request(listUrl(PAGE_SIZE, nextCursor));
      if (mine !== generation) return;
      nextCursor = data.next_cursor;
      for (const batch of data.batches) upsert(batch, { live: false });
      redraw();
    } finally {
      moreButton.disabled = false;
    }
  }

  function showEmpty() {
    const filtered = filter.status || filter.task || filter.name || filter.metadata.length;
    empty.replaceChildren(
      h("p", { class: "empty-title" }, filtered ? "No batches match these filters." : "No batches yet."),
      filtered
        ? h("p", {}, "New ones that match will appear here live.")
        : h(
            "p",
            {},
            "Submit one with ",
            h("code", {}, "POST /v1/batches"),
            " or ",
            h("code", {}, "pgbatch submit TASK items.ndjson"),
            "; it appears here live.",
          ),
    );
  }

  function setFilter(change) {
    Object.assign(filter, change);
    const params = new URLSearchParams();
    if (filter.status) params.set("status", filter.status);
    if (filter.task) params.set("task", filter.task);
    writeLabelFilter(params, filter);
    const hash = params.toString() ? `#/?${params}` : "#/";
    // The filters live in the address (to share or reload), without a new history entry.
    history.replaceState(null, "", hash);
    generation += 1;
    rows.clear();
    tbody.replaceChildren();
    loaded = false;
    nextCursor = null;
    view.dataset.loaded = "false";
    load().catch(ctx.fail);
  }

  const stream = new LiveStream("v1/events", {
    // Events carry no ids: each opening re-reads the page, so nothing changed while the
    // stream was down is missed (the server subscribes before it answers).
    onOpen: () => load().catch(ctx.fail),
    onBatch: (batch) => {
      if (loaded) {
        upsert(batch, { live: true });
        redraw();
      } else if (isNewer(batch, early.get(batch.id))) {
        early.set(batch.id, batch);
      }
    },
    onState: ctx.setLive,
    probe: () => request("v1/batches?limit=1"),
    onFail: ctx.fail,
  }).start();
  const ticker = setInterval(redraw, TICK_MS);

  return {
    heading,
    unmount() {
      stream.close();
      clearInterval(ticker);
      clearTimeout(typing);
      labelInputs.stop();
    },
  };
}
