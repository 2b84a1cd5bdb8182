// A batch's name and metadata (issue 12 §2) on both pages, and the list's filters on
// them. Both are users' strings: they only ever become text nodes (dom.js's h()).

import { h } from "./dom.js";

/** Return the cell that names a batch: its name (if any) above its task. */
export function batchLabel(batch) {
  if (!batch.name) return h("span", { class: "label-task", "data-testid": "batch-name" }, batch.task);
  return h(
    "span",
    { class: "label" },
    h("span", { class: "label-name", "data-testid": "batch-name", title: batch.name }, batch.name),
    h("span", { class: "label-task muted" }, batch.task),
  );
}

/** Return the batch's metadata as a list of "key: value" chips (null when it has none). */
export function metadataChips(batch) {
  const pairs = Object.entries(batch.metadata ?? {});
  if (!pairs.length) return null;
  return h(
    "ul",
    { class: "chips", "data-testid": "metadata" },
    pairs.map(([key, value]) =>
      h("li", { class: "chip", "data-key": key }, h("span", { class: "chip-key" }, key), ": ", value),
    ),
  );
}

/** Tell whether `batch` passes the name and metadata filters (for live rows). */
export function labelsMatch(batch, filter) {
  if (filter.name && batch.name !== filter.name) return false;
  for (const pair of filter.metadata) {
    const at = pair.indexOf(":");
    if (at < 1 || (batch.metadata ?? {})[pair.slice(0, at)] !== pair.slice(at + 1)) return false;
  }
  return true;
}

/** Read the filters from the address: `name=...`, `metadata=key:value` (repeatable). */
export function readLabelFilter(query) {
  return { name: query.get("name") ?? "", metadata: query.getAll("metadata").filter(Boolean) };
}

/** Add the filters to URL parameters, as the API reads them. */
export function writeLabelFilter(params, filter) {
  if (filter.name) params.set("name", filter.name);
  for (const pair of filter.metadata) params.append("metadata", pair);
}

/**
 * Return the filter inputs (name; metadata as "key:value, key:value"), calling
 * `onChange(change)` after a pause in typing.
 */
export function labelFilterInputs(filter, onChange, pauseMs) {
  let typing = null;
  // One timer for both inputs, and both read when it fires: an edit of one never drops
  // a pending edit of the other.
  const later = () => {
    clearTimeout(typing);
    typing = setTimeout(
      () =>
        onChange({
          name: nameInput.value.trim(),
          metadata: metadataInput.value
            .split(",")
            .map((pair) => pair.trim())
            .filter((pair) => pair.indexOf(":") > 0),
        }),
      pauseMs,
    );
  };
  const nameInput = h("input", {
    id: "name-filter",
    type: "search",
    placeholder: "exact name",
    value: filter.name,
    autocomplete: "off",
    "data-testid": "filter-name",
    oninput: later,
  });
  const metadataInput = h("input", {
    id: "metadata-filter",
    type: "search",
    placeholder: "key:value, key:value",
    value: filter.metadata.join(", "),
    autocomplete: "off",
    "data-testid": "filter-metadata",
    oninput: later,
  });
  return {
    nodes: [
      h("label", { class: "task-filter", for: "name-filter" }, h("span", {}, "Name"), nameInput),
      h("label", { class: "task-filter", for: "metadata-filter" }, h("span", {}, "Metadata"), metadataInput),
    ],
    stop: () => clearTimeout(typing),
  };
}
