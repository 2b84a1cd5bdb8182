// The drawer of active jobs (issue 12 §3), reachable from every page through the top
// bar, as product UIs show their exports: every batch of the tenant still running or
// pending (copies, imports, exports, any task), with its progress and a link to it.
// The tenant's event stream keeps it and the count on its button current, open or shut
// (one more stream per tab, fanned out by the server from its one LISTEN).

import { AuthRequired, LiveStream, isNewer, request } from "./api.js";
import { ProgressBar, count, itemsOf, percentDone, statusLabel } from "./components.js";
import { COPY_TASK } from "./copy.js";
import { h, setText } from "./dom.js";

// The API's largest page: a drawer of more active jobs than this says "and more".
const MAX_JOBS = 100;
const ACTIVE = ["running", "pending"];

function kindOf(batch) {
  if (batch.task === COPY_TASK) return "Copy";
  return "Batch";
}

/** One job's entry; `update` shows a newer snapshot. */
class Job {
  constructor(batch, onOpen) {
    this.batch = null;
    this.bar = new ProgressBar(`Job ${batch.id} progress`);
    this.title = h("span", { class: "job-title", "data-testid": "job-title" });
    this.meta = h("span", { class: "job-meta muted" });
    this.el = h(
      "li",
      { class: "job", "data-testid": "job", "data-batch-id": batch.id },
      h(
        "a",
        { href: `#/batches/${batch.id}`, class: "job-link", "data-testid": "job-link", onclick: onOpen },
        h("span", { class: "job-head" }, h("span", { class: "job-kind" }, kindOf(batch)), this.title),
        this.bar.el,
        this.meta,
      ),
    );
    this.update(batch);
  }

  update(batch) {
    if (!isNewer(batch, this.batch)) return;
    this.batch = batch;
    this.el.dataset.status = batch.status;
    // The name a person gave it (a copy's is "copy S → T"); else the task and id.
    setText(this.title, batch.name ?? `${batch.task} #${batch.id}`);
    this.bar.set(batch);
    setText(this.meta, `${statusLabel(batch.status)} · ${itemsOf(batch)} items · ${percentDone(batch)}%`);
  }
}

/** Put the active-jobs button and drawer into `root` (the top bar); return {reload}. */
export function mountJobs(root) {
  const jobs = new Map();
  let stream = null;
  let more = false;

  const badgeCount = h("span", { class: "jobs-count", "data-testid": "jobs-count" }, "0");
  const button = h(
    "button",
    {
      type: "button",
      class: "btn btn-quiet btn-small jobs-button",
      "aria-expanded": "false",
      "aria-controls": "jobs-drawer",
      "data-testid": "jobs-button",
      onclick: () => (drawer.hidden ? open() : close()),
    },
    "Active jobs ",
    badgeCount,
  );
  const list = h("ul", { class: "jobs", "data-testid": "jobs-list" });
  const empty = h("p", { class: "muted", "data-testid": "jobs-empty", hidden: true }, "Nothing is running.");
  const moreNote = h("p", { class: "muted", hidden: true }, `Showing the newest ${MAX_JOBS}.`);
  const drawer = h(
    "aside",
    { id: "jobs-drawer", class: "jobs-drawer card", "aria-label": "Active jobs", "data-testid": "jobs-drawer", "data-loaded": "false", hidden: true },
    h(
      "div",
      { class: "jobs-head" },
      h("h2", { tabindex: -1 }, "Active jobs"),
      h("button", { type: "button", class: "btn btn-quiet btn-small", "data-testid": "jobs-close", onclick: () => close() }, "Close"),
    ),
    list,
    empty,
    moreNote,
  );
  root.prepend(button);
  document.body.append(drawer);

  function show() {
    const active = [...jobs.values()].filter((job) => ACTIVE.includes(job.batch.status) && !job.batch.is_final);
    active.sort((a, b) => b.batch.id - a.batch.id);
    list.replaceChildren(...active.map((job) => job.el));
    setText(badgeCount, more ? `${count(active.length)}+` : count(active.length));
    button.dataset.active = String(active.length > 0);
    empty.hidden = active.length > 0;
    moreNote.hidden = !more;
  }

  function upsert(batch) {
    const job = jobs.get(batch.id);
    if (job) job.update(batch);
    else jobs.set(batch.id, new Job(batch, () => close()));
  }

  /** Read the running and pending batches (two pages of the API's list). */
  async function load() {
    const pages = await Promise.all(ACTIVE.map((status) => request(`v1/batches?status=${status}&limit=${MAX_JOBS}`)));
    more = false;
    const seen = new Set();
    for (const { data } of pages) {
      for (const batch of data.batches) {
        upsert(batch);
        seen.add(batch.id);
      }
      more ||= data.next_cursor !== null;
    }
    // Jobs that ended while nothing streamed leave; the rest keep their entries.
    for (const id of [...jobs.keys()]) if (!seen.has(id)) jobs.delete(id);
    drawer.dataset.loaded = "true";
    show();
  }

  function quietly(promise) {
    // The page itself asks for a token and shows errors; the drawer only waits for them.
    promise.catch((error) => {
      if (!(error instanceof AuthRequired)) console.debug("active jobs:", error);
    });
  }

  function follow() {
    stream?.close();
    // Each opening (and reopening) reads the active jobs again, as the list page does:
    // what changed while the stream was down is not missed.
    stream = new LiveStream("v1/events", {
      onOpen: () => quietly(load()),
      onBatch: (batch) => {
        // A job that ends leaves the drawer; a new one appears with its first event.
        if (ACTIVE.includes(batch.status) || jobs.has(batch.id)) upsert(batch);
        show();
      },
      onState: () => {},
      probe: () => request("v1/batches?limit=1"),
      onFail: () => {},
    }).start();
  }

  function open() {
    drawer.hidden = false;
    button.setAttribute("aria-expanded", "true");
    drawer.querySelector("h2").focus();
  }

  function close() {
    if (drawer.hidden) return;
    drawer.hidden = true;
    button.setAttribute("aria-expanded", "false");
  }

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !drawer.hidden) {
      close();
      button.focus();
    }
  });
  follow();

  return {
    /** Follow the stream again (after a token was given: the stream's address carries it). */
    reload: follow,
  };
}
