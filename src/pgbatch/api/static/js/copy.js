// The collection-copy job view on a copy's batch page (issue 12 §3): source → target and
// associations inserted / already present out of the total, from the collections
// workload's own report (GET v1/collections/copies/ID), not the batch's key ranges.

import { request } from "./api.js";
import { count } from "./components.js";
import { h, setText } from "./dom.js";

/** The task of a collection copy (pgbatch.workloads.collections.copy.TASK). */
export const COPY_TASK = "pgbatch.collection_copy";
// The report is read at most this often however fast the batch's events arrive.
const REPORT_MIN_INTERVAL_MS = 1000;

function figure(name, testid) {
  const value = h("dd", { "data-testid": testid });
  return { value, el: h("div", { class: "stat" }, h("dt", {}, name), value) };
}

/**
 * Return {el, update(batch), dispose()} for a copy's batch: `update` re-reads the report
 * when the batch moved (throttled), and once more when it ends (the final counts).
 */
export function copyView(batchId) {
  const source = h("span", { class: "copy-end", "data-testid": "copy-source" }, "…");
  const target = h("span", { class: "copy-end", "data-testid": "copy-target" }, "…");
  const figures = {
    inserted: figure("Inserted", "copy-inserted"),
    present: figure("Already present", "copy-present"),
    missing: figure("Not in source", "copy-missing"),
    total: figure("Total", "copy-total"),
  };
  const bar = h("div", { class: "bar bar-large copy-bar", role: "progressbar", "aria-label": "Associations copied", "aria-valuemin": 0, "aria-valuemax": 100, "data-testid": "copy-progress" },
    h("span", { class: "bar-ok" }), h("span", { class: "bar-present" }));
  const el = h(
    "section",
    { class: "card copy-card", "aria-labelledby": "copy-title", "data-testid": "copy-view", "data-loaded": "false" },
    h("h2", { id: "copy-title" }, "Collection copy"),
    h("p", { class: "copy-route" }, source, h("span", { class: "copy-arrow", "aria-label": "into" }, " → "), target),
    bar,
    h("dl", { class: "stats" }, Object.values(figures).map((f) => f.el)),
  );
  let timer = null;
  let busy = false;
  let again = false;
  let readAt = -Infinity;
  let disposed = false;
  let lastFinal = false;

  function render(report) {
    setText(source, report.source ?? "—");
    setText(target, report.target ?? "—");
    setText(figures.inserted.value, count(report.inserted));
    setText(figures.present.value, count(report.already_present));
    setText(figures.missing.value, count(report.not_in_source));
    const total = report.associations_total;
    setText(figures.total.value, total === null ? "not recorded" : count(total));
    const done = report.inserted + report.already_present + report.not_in_source;
    const share = (n) => (total ? `${Math.min(100, (n * 100) / total)}%` : "0%");
    bar.dataset.status = report.status;
    bar.children[0].style.width = share(report.inserted);
    bar.children[1].style.width = share(report.already_present + report.not_in_source);
    const pct = total ? Math.floor((Math.min(done, total) * 100) / total) : 0;
    bar.setAttribute("aria-valuenow", pct);
    bar.setAttribute(
      "aria-valuetext",
      total === null
        ? `${count(done)} associations handled`
        : `${count(done)} of ${count(total)} associations (${count(report.inserted)} inserted, ${count(report.already_present)} already present)`,
    );
    el.dataset.loaded = "true";
    el.dataset.finished = String(report.finished);
  }

  async function read() {
    timer = null;
    busy = true;
    readAt = performance.now();
    try {
      const { data } = await request(`v1/collections/copies/${batchId}`);
      if (!disposed) render(data);
    } catch {
      // A failed read costs this refresh only; the next change of the batch reads again.
    } finally {
      busy = false;
      if (again && !disposed) {
        again = false;
        schedule();
      }
    }
  }

  function schedule() {
    if (busy) {
      again = true;
      return;
    }
    if (timer !== null) return;
    timer = setTimeout(read, Math.max(0, readAt + REPORT_MIN_INTERVAL_MS - performance.now()));
  }

  return {
    el,
    update(batch) {
      if (lastFinal && batch.is_final) return;
      lastFinal = batch.is_final;
      schedule();
    },
    dispose() {
      disposed = true;
      clearTimeout(timer);
    },
  };
}
