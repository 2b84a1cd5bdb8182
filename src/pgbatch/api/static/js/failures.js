// The batch page's failures: the error groups (count, first and last seen, sample items
// with their input, each traceback collapsed) and the collapsed traceback of a shard's
// error. Every string here comes from a handler or from its input: it only ever becomes
// a text node (dom.js parses no HTML), so a traceback full of markup shows as text.

import { request } from "./api.js";
import { count, plural, timeAgo } from "./components.js";
import { h } from "./dom.js";

// The groups a page shows (largest first) and the sample items of each.
const GROUPS_SHOWN = 10;
const SAMPLES_SHOWN = 3;

/** Return a collapsed <details> holding `text` as preformatted text (null without text). */
export function tracebackDetails(text, label = "Traceback") {
  if (!text) return null;
  return h(
    "details",
    { class: "traceback", "data-testid": "traceback" },
    h("summary", {}, label),
    h("pre", {}, text),
  );
}

/** Read the batch's largest error groups with their samples. */
export async function loadErrorGroups(batchId) {
  const query = new URLSearchParams({ limit: GROUPS_SHOWN, samples: SAMPLES_SHOWN });
  const { data } = await request(`v1/batches/${batchId}/errors?${query}`);
  return data;
}

function seen(iso) {
  return iso ? timeAgo(iso) : "—";
}

function inputText(value) {
  const text = JSON.stringify(value);
  return text === undefined ? "—" : text;
}

function groupItem(group) {
  return h(
    "li",
    { class: "error-group", "data-testid": "error-group", "data-items": group.items },
    h(
      "div",
      { class: "error-group-head" },
      h("span", { class: "error-group-count", "data-testid": "error-group-count" }, plural(group.items, "item")),
      h("code", { class: "error-group-error", "data-testid": "error-group-error" }, group.error),
    ),
    h(
      "p",
      { class: "hint error-group-seen" },
      "First seen ",
      seen(group.first_seen_at),
      " · last seen ",
      seen(group.last_seen_at),
      ` · first item #${group.first_seq}`,
    ),
    group.samples.length
      ? h(
          "table",
          { class: "errors error-samples-of-group", "data-testid": "error-group-samples" },
          h(
            "thead",
            {},
            h("tr", {}, h("th", { scope: "col" }, "Item"), h("th", { scope: "col" }, "Input and traceback")),
          ),
          h(
            "tbody",
            {},
            group.samples.map((sample) =>
              h(
                "tr",
                { "data-testid": "error-group-sample", "data-seq": sample.seq },
                h("td", { class: "num" }, `#${sample.seq}`),
                h(
                  "td",
                  {},
                  h("code", { class: "input", "data-testid": "sample-input" }, inputText(sample.input)),
                  tracebackDetails(sample.traceback),
                ),
              ),
            ),
          ),
        )
      : null,
  );
}

/** Return the nodes of the error groups section (none when nothing failed). */
export function errorGroupsSection(data) {
  if (!data || !data.groups.length) return [];
  const shown =
    data.groups.length < data.groups_total
      ? `largest ${data.groups.length} of ${count(data.groups_total)}`
      : `${count(data.groups_total)}`;
  return [
    h("h3", {}, `Error groups (${shown})`),
    h("ol", { class: "error-groups", "data-testid": "error-groups" }, data.groups.map(groupItem)),
  ];
}

/** Return the nodes of the batch's last error: the shard, its message, its traceback. */
export function lastErrorSection(last) {
  if (!last) return [];
  const items = last.first_seq === last.last_seq ? `item #${last.first_seq}` : `items #${last.first_seq}–${last.last_seq}`;
  return [
    h("h3", {}, "Last error"),
    h(
      "div",
      { class: "last-error", "data-testid": "last-error" },
      h("p", { class: "hint" }, `Shard #${last.shard_no} (${items}, ${last.status})`, last.at ? [" · ", timeAgo(last.at)] : null),
      h("code", { class: "error-text", "data-testid": "last-error-text" }, last.error),
      tracebackDetails(last.traceback),
    ),
  ];
}
