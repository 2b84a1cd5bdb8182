// The LLM workload's card on a batch page: tokens, upstream calls, 429s, cache hits and
// the estimated cost, from GET /v1/llm/batches/{id}/usage. Shown for llm.request batches.

import { request } from "./api.js";
import { h, setText } from "./dom.js";

export const LLM_TASK = "llm.request";
// A batch page re-renders on every progress event; the usage is read at most this often.
const REFRESH_MS = 2000;

const FIELDS = [
  ["requests", "Requests"],
  ["upstream_calls", "Upstream calls"],
  ["rate_limited", "429s"],
  ["cache_hits", "Cache hits"],
  ["prompt_tokens", "Prompt tokens"],
  ["completion_tokens", "Completion tokens"],
  ["cached_tokens", "Cached tokens"],
];

/** Return the usage card of batch `batchId`: {el, refresh(final)}. */
export function llmUsageCard(batchId) {
  const values = Object.fromEntries(FIELDS.map(([key]) => [key, h("dd", { "data-testid": `llm-${key}` }, "—")]));
  const cost = h("dd", { "data-testid": "llm-cost" }, "—");
  const el = h(
    "section",
    { class: "card", "aria-labelledby": "llm-usage-title", "data-testid": "llm-usage" },
    h("h2", { id: "llm-usage-title" }, "Usage and cost"),
    h(
      "dl",
      { class: "details" },
      FIELDS.flatMap(([key, label]) => [h("dt", {}, label), values[key]]),
      h("dt", {}, "Estimated cost"),
      cost,
    ),
  );
  let lastAt = -Infinity;
  let busy = false;

  async function refresh(final = false) {
    const now = performance.now();
    if (busy || (!final && now - lastAt < REFRESH_MS)) return;
    busy = true;
    lastAt = now;
    try {
      const { data } = await request(`v1/llm/batches/${batchId}/usage`);
      for (const [key] of FIELDS) setText(values[key], Number(data.total[key]).toLocaleString());
      setText(cost, data.cost_usd === null ? "no price for these models" : `$${data.cost_usd.toFixed(6)}`);
      el.dataset.loaded = "true";
    } catch {
      // The card is extra: the page keeps working if the usage cannot be read now.
    } finally {
      busy = false;
    }
  }

  return { el, refresh };
}
