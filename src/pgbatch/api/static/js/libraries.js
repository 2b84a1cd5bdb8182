// Vector libraries (#/libraries and #/libraries/ID): the tenant's libraries with their
// documents counted by status, and one library's documents, their indexing state and
// batches, and a search box. The pages poll while a document is pending or indexing
// (the event stream is about batches; each document links to its indexing batch, whose
// page is live), and stop polling once everything is indexed or failed.

import { request } from "./api.js";
import { h, setText } from "./dom.js";

const POLL_MS = 1000;
const PAGE_SIZE = 200;
const STATUSES = ["pending", "indexing", "indexed", "failed", "cancelled"];

function countsText(counts) {
  const parts = STATUSES.filter((s) => counts?.[s]).map((s) => `${counts[s]} ${s}`);
  return parts.length ? parts.join(", ") : "no documents";
}

function busy(counts) {
  return Boolean(counts?.pending || counts?.indexing);
}

/** Mount the list of libraries; return {heading, unmount}. */
export function mountLibraries(root, ctx) {
  const heading = h("h1", { tabindex: -1 }, "Libraries");
  const tbody = h("tbody");
  const empty = h("p", { class: "empty", "data-testid": "libraries-empty", hidden: true }, "No libraries yet. Create one with ", h("code", {}, "pgbatch libraries create NAME"), ".");
  const table = h(
    "table",
    { class: "batches", "data-testid": "library-list" },
    h("caption", { class: "sr-only" }, "Vector libraries"),
    h("thead", {}, h("tr", {}, ["Library", "Name", "Embedder", "Documents"].map((n) => h("th", { scope: "col" }, n)))),
    tbody,
  );
  const view = h(
    "section",
    { class: "view list-view", "data-testid": "libraries-view", "data-loaded": "false" },
    h("div", { class: "view-head" }, h("div", {}, heading, h("p", { class: "summary" }, h("a", { href: "#/" }, "Batches")))),
    h("div", { class: "card table-card" }, table, empty),
  );
  root.append(view);
  document.title = "Libraries · pgbatch";
  let timer = null;
  let stopped = false;

  async function load() {
    const { data } = await request(`v1/libraries?limit=${PAGE_SIZE}`);
    const details = await Promise.all(data.libraries.map((l) => request(`v1/libraries/${l.id}`)));
    tbody.replaceChildren(
      ...details.map(({ data: lib }) =>
        h(
          "tr",
          { "data-testid": "library-row", "data-id": lib.id },
          h("td", {}, h("a", { href: `#/libraries/${lib.id}` }, `#${lib.id}`)),
          h("td", {}, lib.name),
          h("td", {}, `${lib.embedder} (${lib.dimension})`),
          h("td", { "data-testid": "library-counts" }, countsText(lib.documents)),
        ),
      ),
    );
    empty.hidden = details.length > 0;
    view.dataset.loaded = "true";
    ctx.setLive(details.some(({ data: lib }) => busy(lib.documents)) ? "live" : "final");
    return details.some(({ data: lib }) => busy(lib.documents));
  }

  async function tick() {
    try {
      const again = await load();
      if (!stopped && again) timer = setTimeout(tick, POLL_MS);
    } catch (error) {
      ctx.fail(error);
    }
  }
  tick();
  return {
    heading,
    unmount() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** Mount one library: its documents live while they index, and a search form. */
export function mountLibrary(root, id, ctx) {
  const heading = h("h1", { tabindex: -1 }, `Library #${id}`);
  const summary = h("p", { class: "summary", "data-testid": "library-summary" });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "batches", "data-testid": "document-list" },
    h("caption", { class: "sr-only" }, "Documents and their indexing state"),
    h("thead", {}, h("tr", {}, ["Document", "Status", "Chunks", "Version", "Batch", "Metadata"].map((n) => h("th", { scope: "col" }, n)))),
    tbody,
  );
  const queryInput = h("input", { id: "search-text", name: "text", type: "search", required: true, "data-testid": "search-text" });
  const results = h("ol", { class: "search-results", "data-testid": "search-results" });
  const form = h(
    "form",
    {
      class: "filters",
      role: "search",
      "data-testid": "search-form",
      onsubmit: (event) => {
        event.preventDefault();
        search().catch(ctx.fail);
      },
    },
    h("label", { for: "search-text" }, h("span", {}, "Search"), queryInput),
    h("button", { type: "submit", class: "btn btn-primary", "data-testid": "search-submit" }, "Search"),
  );
  const view = h(
    "section",
    { class: "view detail-view", "data-testid": "library-view", "data-loaded": "false" },
    h("div", { class: "view-head" }, h("div", {}, h("a", { href: "#/libraries" }, "← Libraries"), heading, summary)),
    h("div", { class: "card table-card" }, table),
    h("div", { class: "card" }, form, results),
  );
  root.append(view);
  let timer = null;
  let stopped = false;

  async function search() {
    const { data } = await request(`v1/libraries/${id}/search`, { method: "POST", body: { text: queryInput.value, k: 10 } });
    results.replaceChildren(
      ...data.hits.map((hit) =>
        h("li", { "data-testid": "search-hit" }, h("strong", {}, hit.score.toFixed(3)), ` doc #${hit.document_id} · chunk ${hit.seq}: `, hit.text),
      ),
    );
    if (!data.hits.length) results.replaceChildren(h("li", {}, "No hits."));
  }

  async function load() {
    const [{ data: lib }, { data: page }] = await Promise.all([
      request(`v1/libraries/${id}`),
      request(`v1/libraries/${id}/documents?limit=${PAGE_SIZE}`),
    ]);
    setText(heading, lib.name);
    document.title = `${lib.name} · Libraries · pgbatch`;
    setText(summary, `${lib.embedder} (${lib.dimension} dimensions) · ${countsText(lib.documents)}`);
    tbody.replaceChildren(
      ...page.documents.map((doc) =>
        h(
          "tr",
          { "data-testid": "document-row", "data-id": doc.id, "data-status": doc.status },
          h("td", {}, `#${doc.id}`),
          h("td", {}, h("span", { class: `badge badge-${doc.status}`, "data-testid": "document-status" }, doc.status), doc.error ? h("span", { class: "failed-count" }, ` ${doc.error}`) : null),
          h("td", { class: "num" }, String(doc.chunk_count)),
          h("td", { class: "num" }, `${doc.indexed_version ?? "–"} / ${doc.content_version}`),
          h("td", {}, doc.batch_id ? h("a", { href: `#/batches/${doc.batch_id}` }, `#${doc.batch_id}`) : "–"),
          h("td", {}, h("code", {}, JSON.stringify(doc.metadata))),
        ),
      ),
    );
    view.dataset.loaded = "true";
    ctx.setLive(busy(lib.documents) ? "live" : "final");
    return busy(lib.documents);
  }

  async function tick() {
    try {
      const again = await load();
      if (!stopped && again) timer = setTimeout(tick, POLL_MS);
    } catch (error) {
      ctx.fail(error);
    }
  }
  tick();
  return {
    heading,
    unmount() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
