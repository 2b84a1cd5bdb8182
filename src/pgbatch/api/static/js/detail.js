// The batch page (#/batches/ID): progress from the batch's own event stream, and its
// insight (shard states, throughput, errors) re-read when an event says it changed, at
// most once a second. Cancel, Retry and Priority send If-Match with the ETag of the
// snapshot on screen, so an action is refused (412) if the batch moved on meanwhile.

import { ApiError, AuthRequired, LiveStream, etagOf, isNewer, request, token } from "./api.js";
import { throughputChart } from "./chart.js";
import {
  ProgressBar,
  RateMeter,
  badge,
  count,
  duration,
  elapsed,
  tookText,
  itemsOf,
  percentDone,
  plural,
  setBadge,
  statusLabel,
  timeAgo,
  refreshTimes,
} from "./components.js";
import { COPY_TASK, copyView } from "./copy.js";
import { h, setText } from "./dom.js";
import { waitingLabel, waitingReason, waitingSentence } from "./fleet.js";
import { errorGroupsSection, lastErrorSection, loadErrorGroups, tracebackDetails } from "./failures.js";
import { metadataChips } from "./labels.js";
import { LLM_TASK, llmUsageCard } from "./llm.js";

// The insight is read at most this often however fast events arrive (it counts shards
// and scans throughput: cheap, but not for every event of a fast batch).
const INSIGHT_MIN_INTERVAL_MS = 1000;
// Only a batch's first claim sends an event (it turns the batch "running"); later claims
// and lease expiries do not, so while the batch is open and quiet its insight is also
// re-read this often, to keep the running shards honest. Like the server's fallback poll.
const INSIGHT_IDLE_MS = 5000;
const TICK_MS = 1000;
const SHARD_STATES = ["queued", "running", "done", "dead", "cancelled"];

function stat(name, testid) {
  const label = h("dt", {}, name);
  const value = h("dd", { "data-testid": testid });
  return { label, value, el: h("div", { class: "stat" }, label, value) };
}

function when(iso) {
  return iso ? timeAgo(iso) : "—";
}

/** Show batch `batchId` (a string: ids may exceed what a JS number holds exactly). */
export function mountDetail(root, batchId, ctx) {
  const meter = new RateMeter();
  let batch = null;
  let etag = null;
  let stream = null;
  let disposed = false;
  let insightTimer = null;
  let idleTimer = null;
  let insightBusy = false;
  let insightAgain = false;
  let insightAt = -Infinity;
  let busy = false;

  const heading = h("h1", { tabindex: -1 }, "Batch ", h("span", { class: "batch-id" }, `#${batchId}`));
  const taskName = h("span", { class: "task-name", "data-testid": "batch-task" });
  const batchName = h("p", { class: "batch-title", "data-testid": "batch-title", hidden: true });
  const copyBox = h("div", { class: "copy-slot" });
  let copy = null;
  const statusBadge = badge();
  const retryButton = h(
    "button",
    { type: "button", class: "btn", "data-testid": "retry-button", onclick: () => retry() },
    "Retry failed",
  );
  const cancelButton = h(
    "button",
    { type: "button", class: "btn btn-danger", "data-testid": "cancel-button", onclick: () => confirmDialog.showModal() },
    "Cancel batch",
  );
  const notice = h("div", { class: "notice", role: "status", "data-testid": "notice", hidden: true });
  const waiting = h("div", { class: "notice", "data-tone": "warn", "data-testid": "waiting-reason", hidden: true });
  const bar = new ProgressBar(`Batch ${batchId} progress`, { large: true });
  const headline = h("p", { class: "headline", "data-testid": "headline" });
  const percent = h("span", { class: "headline-pct" });
  const stats = {
    ok: stat("Succeeded", "items-ok"),
    failed: stat("Failed", "items-failed"),
    cancelled: stat("Cancelled", "items-cancelled"),
    shards: stat("Shards done", "shards-done"),
    pace: stat("Pace", "pace"),
  };
  const shardBox = h("div", { class: "shards", "data-testid": "shard-states" }, h("p", { class: "muted" }, "Loading…"));
  const chartBox = h("div", { class: "chart-box" }, h("p", { class: "muted" }, "Loading…"));
  const errorBox = h("div", { "data-testid": "errors" }, h("p", { class: "muted" }, "Loading…"));
  const details = h("dl", { class: "details", "data-testid": "details" });
  const priorityInput = h("input", {
    id: "priority",
    type: "number",
    step: 1,
    class: "priority-input",
    "data-testid": "priority-input",
  });
  const prioritySave = h("button", { type: "submit", class: "btn btn-small", "data-testid": "priority-save" }, "Set");
  const priorityForm = h(
    "form",
    {
      class: "priority-form",
      onsubmit: (event) => {
        event.preventDefault();
        setPriority();
      },
    },
    h("label", { for: "priority" }, "Priority"),
    priorityInput,
    prioritySave,
  );
  const keepButton = h("button", { type: "submit", value: "keep", class: "btn", autofocus: true }, "Keep running");
  const confirmDialog = h(
    "dialog",
    { class: "confirm", "data-testid": "confirm-dialog", "aria-labelledby": "confirm-title" },
    h(
      "form",
      { method: "dialog" },
      h("h2", { id: "confirm-title" }, `Cancel batch #${batchId}?`),
      h(
        "p",
        {},
        "Queued shards stop now and running ones at their next heartbeat. Results written so far are kept. ",
        "A cancelled batch cannot be retried.",
      ),
      h(
        "div",
        { class: "dialog-actions" },
        keepButton,
        h("button", { type: "submit", value: "cancel", class: "btn btn-danger", "data-testid": "confirm-cancel" }, "Cancel batch"),
      ),
    ),
  );
  confirmDialog.addEventListener("close", () => {
    if (confirmDialog.returnValue === "cancel") cancel();
    confirmDialog.returnValue = "";
  });

  const view = h(
    "section",
    { class: "view detail-view", "data-testid": "batch-view", "data-batch-id": batchId, "data-loaded": "false" },
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/", "data-testid": "back-link" }, "← All batches")),
    h(
      "div",
      { class: "view-head" },
      h("div", { class: "title" }, heading, taskName, statusBadge),
      h("div", { class: "actions" }, retryButton, cancelButton),
    ),
    batchName,
    notice,
    waiting,
    copyBox,
    h(
      "section",
      { class: "card progress-card", "aria-label": "Progress" },
      h("div", { class: "headline-row" }, headline, percent),
      bar.el,
      h("dl", { class: "stats" }, Object.values(stats).map((s) => s.el)),
    ),
    h(
      "div",
      { class: "grid grid-split" },
      h("section", { class: "card", "aria-labelledby": "shards-title" }, h("h2", { id: "shards-title" }, "Shards"), shardBox),
      h(
        "section",
        { class: "card", "aria-labelledby": "throughput-title" },
        h("h2", { id: "throughput-title" }, "Throughput"),
        chartBox,
      ),
    ),
    h(
      "div",
      { class: "grid grid-top" },
      h("section", { class: "card", "aria-labelledby": "errors-title" }, h("h2", { id: "errors-title" }, "Errors"), errorBox),
      h(
        "section",
        { class: "card", "aria-labelledby": "details-title" },
        h("h2", { id: "details-title" }, "Details"),
        details,
        priorityForm,
        resultLinks(),
      ),
    ),
    confirmDialog,
  );
  root.append(view);
  document.title = `Batch #${batchId} · pgbatch`;

  function resultLinks() {
    // A link cannot send headers: the token (if any) and the format go in the query.
    const base = `v1/batches/${batchId}/results`;
    const link = (params) => {
      const query = new URLSearchParams(params);
      if (token()) query.set("access_token", token());
      return `${base}?${query}`;
    };
    return h(
      "p",
      { class: "hint", "data-testid": "result-links" },
      "Results: ",
      h("a", { href: link({}), download: `batch-${batchId}.ndjson` }, "NDJSON"),
      " · ",
      h("a", { href: link({ format: "csv" }), download: `batch-${batchId}.csv` }, "CSV"),
      " · ",
      h(
        "a",
        { href: link({ status: "error", format: "csv" }), download: `batch-${batchId}-errors.csv` },
        "failed items (CSV)",
      ),
    );
  }

  function say(message, tone) {
    notice.hidden = false;
    notice.dataset.tone = tone;
    notice.textContent = message;
  }

  /** Show a snapshot if it is newer than the one on screen; remember its ETag. */
  function apply(snapshot, tag) {
    if (!isNewer(snapshot, batch)) {
      if (tag && snapshot.version === batch.version) etag = tag;
      return false;
    }
    batch = snapshot;
    etag = tag ?? etagOf(snapshot);
    meter.record(snapshot);
    render();
    return true;
  }

  function render() {
    setText(taskName, batch.task);
    setText(batchName, batch.name ?? "");
    batchName.hidden = !batch.name;
    if (batch.task === COPY_TASK && !copy) {
      copy = copyView(batchId);
      copyBox.replaceChildren(copy.el);
    }
    copy?.update(batch);
    setBadge(statusBadge, batch);
    view.dataset.status = batch.status;
    bar.set(batch);
    setText(headline, `${itemsOf(batch)} items`);
    setText(percent, `${percentDone(batch)}%`);
    setText(stats.ok.value, count(batch.items_ok));
    setText(stats.failed.value, count(batch.items_failed));
    // Cancelled items apart from failed ones (issue 12 §3); shown once there are some.
    setText(stats.cancelled.value, count(batch.items_cancelled ?? 0));
    stats.cancelled.el.hidden = !batch.items_cancelled && batch.status !== "cancelled";
    stats.failed.el.classList.toggle("is-bad", batch.items_failed > 0);
    const dead = batch.shards_dead ? ` (${count(batch.shards_dead)} dead)` : "";
    setText(stats.shards.value, `${count(batch.shards_done)} of ${count(batch.total_shards)}${dead}`);
    tick();
    renderDetails();
    renderButtons();
    renderWorkload();
  }

  let llmCard = null;
  /** An LLM batch gets its usage card after the progress card. */
  function renderWorkload() {
    if (batch.task !== LLM_TASK) return;
    if (!llmCard) {
      llmCard = llmUsageCard(batchId);
      view.querySelector(".progress-card").after(llmCard.el);
    }
    llmCard.refresh(["succeeded", "failed", "cancelled"].includes(batch.status));
  }

  function tick() {
    if (batch) {
      // A batch nothing will run says why (fleet.js), not just "waiting 5 min".
      const reason = waitingReason(batch);
      waiting.hidden = !reason;
      waiting.dataset.reason = reason ?? "";
      if (reason) setText(waiting, waitingSentence(reason, batch));
      setText(stats.pace.value, reason ? `${waitingLabel(reason)} · ${meter.describe(batch)}` : meter.describe(batch));
    }
    refreshTimes(details);
  }

  function renderDetails() {
    const rows = [
      ["Name", batch.name ?? "—"],
      ["Task", batch.task],
      ["Queue", batch.queue],
      ["Run", batch.run_no > 1 ? `${batch.run_no} (retried)` : String(batch.run_no)],
      ["Shard size", plural(batch.shard_size, "item")],
      ["Max attempts", count(batch.max_attempts)],
      ["Lease", duration(batch.lease_ttl_s)],
      ["Created", when(batch.created_at)],
      ["Started", when(batch.started_at)],
      ["Finished", when(batch.finished_at)],
      [batch.is_final ? "Took" : "So far", duration(elapsed(batch))],
      ["Waiting / running", tookText(batch)],
      ["Version", String(batch.version)],
    ];
    if (batch.idempotency_key) rows.push(["Idempotency key", batch.idempotency_key]);
    if (batch.on_complete) rows.push(["On complete", batch.on_complete]);
    const chips = metadataChips(batch);
    if (chips) rows.push(["Metadata", chips]);
    details.replaceChildren(...rows.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))));
    if (document.activeElement !== priorityInput) priorityInput.value = String(batch.priority);
  }

  function renderButtons() {
    const final = batch.is_final;
    // A cancelled batch is "ending" until its running shards stop: nothing to cancel.
    const ended = final || batch.status === "cancelled";
    cancelButton.disabled = busy || ended;
    cancelButton.title = ended ? `The batch is ${batch.status}.` : "";
    const retriable = batch.status !== "cancelled" && (batch.items_failed > 0 || batch.shards_dead > 0);
    retryButton.disabled = busy || !retriable;
    retryButton.title = retriable ? "Run the dead shards and the shards with failed items again." : "Nothing to retry.";
    priorityInput.disabled = ended;
    prioritySave.disabled = busy || ended;
  }

  function renderInsight(insight, groups) {
    apply(insight.batch);
    const states = insight.shard_states;
    const total = SHARD_STATES.reduce((sum, s) => sum + (states[s] ?? 0), 0) || 1;
    shardBox.replaceChildren(
      h(
        "div",
        { class: "stack", "aria-hidden": "true" },
        SHARD_STATES.map((s) =>
          states[s] ? h("span", { class: `stack-${s}`, style: { width: `${(states[s] * 100) / total}%` } }) : null,
        ),
      ),
      h(
        "ul",
        { class: "legend" },
        SHARD_STATES.map((s) =>
          h(
            "li",
            { "data-state": s, "data-count": states[s] ?? 0 },
            h("span", { class: `swatch stack-${s}`, "aria-hidden": "true" }),
            h("span", { class: "legend-name" }, s[0].toUpperCase() + s.slice(1)),
            h("span", { class: "legend-count" }, count(states[s] ?? 0)),
          ),
        ),
      ),
    );
    chartBox.replaceChildren(throughputChart(insight));
    renderErrors(insight, groups);
  }

  function renderErrors(insight, groups) {
    const parts = [];
    const { error_samples: samples, dead_shards: deadShards } = insight;
    if (samples.length) {
      const shown = samples.length < insight.batch.items_failed ? `first ${samples.length} of ${count(insight.batch.items_failed)}` : `${samples.length}`;
      parts.push(
        h("h3", {}, `Failed items (${shown})`),
        h(
          "table",
          { class: "errors", "data-testid": "error-samples" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Item"), h("th", { scope: "col" }, "Error"))),
          h("tbody", {}, samples.map((e) => h("tr", {}, h("td", { class: "num" }, `#${e.seq}`), h("td", {}, h("code", {}, e.error))))),
        ),
      );
    }
    if (deadShards.length) {
      parts.push(
        h("h3", {}, `Dead shards (${count(insight.batch.shards_dead)})`),
        h(
          "table",
          { class: "errors", "data-testid": "dead-shards" },
          h(
            "thead",
            {},
            h("tr", {}, h("th", { scope: "col" }, "Shard"), h("th", { scope: "col" }, "Items"), h("th", { scope: "col" }, "Last error")),
          ),
          h(
            "tbody",
            {},
            deadShards.map((d) =>
              h(
                "tr",
                {},
                h("td", { class: "num" }, `#${d.shard_no}`),
                h("td", { class: "num" }, d.first_seq === d.last_seq ? `#${d.first_seq}` : `#${d.first_seq}–${d.last_seq}`),
                h("td", {}, h("code", {}, d.error ?? "—"), tracebackDetails(d.traceback)),
              ),
            ),
          ),
        ),
      );
    }
    parts.push(...errorGroupsSection(groups), ...lastErrorSection(insight.last_error));
    if (!parts.length) parts.push(h("p", { class: "muted ok-note" }, "No errors."));
    errorBox.replaceChildren(...parts);
  }

  function scheduleInsight() {
    if (disposed) return;
    if (insightBusy) {
      insightAgain = true;
      return;
    }
    if (insightTimer !== null) return;
    const wait = Math.max(0, insightAt + INSIGHT_MIN_INTERVAL_MS - performance.now());
    insightTimer = setTimeout(refreshInsight, wait);
  }

  async function refreshInsight() {
    insightTimer = null;
    clearTimeout(idleTimer);
    insightBusy = true;
    insightAt = performance.now();
    try {
      const { data } = await request(`v1/batches/${batchId}/insight`);
      // Error groups only for a batch with failed items (the read is skipped otherwise).
      const groups = data.batch.items_failed > 0 ? await loadErrorGroups(batchId) : null;
      if (!disposed) renderInsight(data, groups);
    } catch (error) {
      // Anything but a missing token only costs this refresh; the next change retries.
      if (error instanceof AuthRequired) ctx.fail(error);
    } finally {
      insightBusy = false;
      if (insightAgain) {
        insightAgain = false;
        scheduleInsight();
      } else if (!disposed && batch && !batch.is_final) {
        idleTimer = setTimeout(scheduleInsight, INSIGHT_IDLE_MS);
      }
    }
  }

  function watch() {
    stream?.close();
    stream = new LiveStream(`v1/batches/${batchId}/events`, {
      onBatch: (snapshot, ended) => {
        apply(snapshot);
        scheduleInsight();
        if (ended) {
          // The server closes the stream after `end`; a retry opens a new one.
          stream.close();
          ctx.setLive("final");
        }
      },
      onState: ctx.setLive,
      probe: () => request(`v1/batches/${batchId}`),
      onFail: ctx.fail,
    }).start();
  }

  async function reread() {
    const { data, etag: tag } = await request(`v1/batches/${batchId}`);
    apply(data, tag);
  }

  /** Run an If-Match action; on 412/409 read the batch again and say what happened. */
  async function act(action, { stale, conflict }) {
    busy = true;
    renderButtons();
    view.setAttribute("aria-busy", "true");
    try {
      await action();
    } catch (error) {
      if (error instanceof AuthRequired) {
        ctx.fail(error);
      } else if (error instanceof ApiError && (error.status === 412 || error.status === 409)) {
        await reread().catch(() => {});
        say(error.status === 412 ? stale() : conflict(error), "warn");
      } else if (error instanceof ApiError) {
        say(error.message, "error");
      } else {
        say(`Could not reach the API (${error.message}). Nothing was changed.`, "error");
      }
    } finally {
      busy = false;
      view.removeAttribute("aria-busy");
      if (batch) renderButtons();
    }
  }

  function staleMessage(verb) {
    return () =>
      `The batch changed since this page last read it (it is now ${statusLabel(batch.status).toLowerCase()}, ` +
      `${itemsOf(batch)} items). Nothing was ${verb}: check it and try again if you still want to.`;
  }

  function cancel() {
    return act(
      async () => {
        const { data, etag: tag } = await request(`v1/batches/${batchId}`, {
          method: "PATCH",
          body: { status: "cancelled" },
          ifMatch: etag,
        });
        apply(data, tag);
        say("Batch cancelled. Running shards stop at their next heartbeat.", "ok");
        scheduleInsight();
      },
      {
        stale: staleMessage("cancelled"),
        conflict: () => `Nothing to cancel: the batch has already ended (${statusLabel(batch.status).toLowerCase()}).`,
      },
    );
  }

  function retry() {
    return act(
      async () => {
        const { data, etag: tag } = await request(`v1/batches/${batchId}/retry`, { method: "POST", ifMatch: etag });
        apply(data.batch, tag);
        if (data.requeued_shards === 0) {
          say("Nothing to retry: no dead shards and no failed items.", "info");
          return;
        }
        const shards = data.requeued_shards === 1 ? "1 shard" : `${count(data.requeued_shards)} shards`;
        say(`Re-queued ${shards}; this is run ${data.batch.run_no}.`, "ok");
        if (!data.batch.is_final) watch();
        scheduleInsight();
      },
      { stale: staleMessage("retried"), conflict: (error) => error.message },
    );
  }

  function setPriority() {
    const priority = Number(priorityInput.value);
    if (!Number.isInteger(priority)) {
      say("Priority is a whole number (higher runs first).", "error");
      return;
    }
    act(
      async () => {
        const { data, etag: tag } = await request(`v1/batches/${batchId}`, {
          method: "PATCH",
          body: { priority },
          ifMatch: etag,
        });
        apply(data, tag);
        priorityInput.value = String(data.priority);
        say(`Priority set to ${data.priority}.`, "ok");
      },
      { stale: staleMessage("changed"), conflict: (error) => error.message },
    );
  }

  function notFound(message, { title = `No batch #${batchId}`, testId = "not-found" } = {}) {
    view.replaceChildren(
      h("nav", { class: "crumbs" }, h("a", { href: "#/", "data-testid": "back-link" }, "← All batches")),
      h(
        "div",
        { class: "card empty", "data-testid": testId },
        h("p", { class: "empty-title" }, title),
        h("p", {}, message),
      ),
    );
    ctx.setLive("final");
  }

  (async () => {
    try {
      const { data, etag: tag } = await request(`v1/batches/${batchId}`);
      if (disposed) return;
      apply(data, tag);
      view.dataset.loaded = "true";
      watch();
      scheduleInsight();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        notFound(`${error.message}. It may belong to another tenant, or the id is wrong.`);
      } else if (error instanceof ApiError && error.status === 410) {
        // Retention removed it: say when, not "no such batch".
        notFound(`${error.message}. Export results before a batch's retention period ends.`, {
          title: `Batch #${batchId} has expired`,
          testId: "expired",
        });
      } else {
        ctx.fail(error);
      }
    }
  })();
  const ticker = setInterval(tick, TICK_MS);

  return {
    heading,
    unmount() {
      disposed = true;
      stream?.close();
      clearTimeout(insightTimer);
      clearTimeout(idleTimer);
      clearInterval(ticker);
      copy?.dispose();
      if (confirmDialog.open) confirmDialog.close();
    },
  };
}
