// The throughput chart of a batch page: items finished per time bucket, drawn as inline
// SVG from the insight (the server counts finished shards per bucket; buckets where
// nothing finished are missing there, and are drawn here as empty).

import { duration, plural, rate } from "./components.js";
import { h, svg } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 190;
const LEFT = 52; // room for the y labels
const RIGHT = 8;
const TOP = 12;
const BOTTOM = 26; // room for the x labels
// The server aims at about 60 buckets over the batch's life; a running batch can drift
// past that between reads, so the oldest bars beyond this many are left out.
const MAX_BARS = 120;
// A short batch has a few buckets only: its bars keep this width at most, from the left,
// instead of a lone bar across the whole chart.
const MIN_SLOTS = 30;

const clock = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

function floorTo(ms, stepMs) {
  return Math.floor(ms / stepMs) * stepMs;
}

/** Return the buckets from the batch's start to its end (or now), zeros included. */
export function buckets(insight, nowMs = Date.now()) {
  const { batch, bucket_s: bucketS, throughput } = insight;
  const stepMs = bucketS * 1000;
  const finished = new Map(throughput.map((p) => [floorTo(Date.parse(p.at), stepMs), p.items]));
  const starts = [...finished.keys()];
  // From the submission: the wait before the first shards finished shows as empty bars.
  const begin = Date.parse(batch.created_at);
  const end = batch.finished_at ? Date.parse(batch.finished_at) : nowMs;
  let first = floorTo(Math.min(begin, ...starts), stepMs);
  const last = floorTo(Math.max(end, ...starts), stepMs);
  if ((last - first) / stepMs + 1 > MAX_BARS) first = last - (MAX_BARS - 1) * stepMs;
  const out = [];
  for (let at = first; at <= last; at += stepMs) out.push({ at, items: finished.get(at) ?? 0 });
  return out;
}

/** Return the chart (a <figure>), or a short note when nothing has finished yet. */
export function throughputChart(insight) {
  const { batch, bucket_s: bucketS, throughput } = insight;
  if (throughput.length === 0) {
    const note = batch.is_final ? "No item was processed." : "No shard has finished yet.";
    return h("p", { class: "chart-empty", "data-testid": "throughput-chart", "data-bars": 0 }, note);
  }
  const bars = buckets(insight);
  const peak = Math.max(...bars.map((b) => b.items), 1);
  const total = bars.reduce((sum, b) => sum + b.items, 0);
  const plotW = WIDTH - LEFT - RIGHT;
  const plotH = HEIGHT - TOP - BOTTOM;
  const step = plotW / Math.max(bars.length, MIN_SLOTS);
  const gap = Math.min(2, step * 0.25);
  const y = (items) => TOP + plotH - (items / peak) * plotH;

  const grid = [peak, peak / 2, 0].map((items) =>
    svg(
      "g",
      { class: "chart-grid" },
      svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(items), y2: y(items) }),
      svg(
        "text",
        { x: LEFT - 6, y: y(items), "text-anchor": "end", "dominant-baseline": "middle" },
        rate(items / bucketS),
      ),
    ),
  );
  const columns = bars.map((b, i) => {
    const top = y(b.items);
    const label = `${clock.format(b.at)}: ${plural(b.items, "item")} (${rate(b.items / bucketS)})`;
    return svg(
      "rect",
      {
        class: b.items ? "chart-bar" : "chart-bar chart-bar-empty",
        x: LEFT + i * step + gap / 2,
        y: b.items ? top : TOP + plotH - 1,
        width: Math.max(step - gap, 0.5),
        height: b.items ? Math.max(TOP + plotH - top, 1) : 1,
      },
      svg("title", {}, label),
    );
  });
  const lastAt = bars.at(-1).at + bucketS * 1000;
  const axis = svg(
    "g",
    { class: "chart-axis" },
    svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: TOP + plotH, y2: TOP + plotH }),
    svg("text", { x: LEFT, y: HEIGHT - 6, "text-anchor": "start" }, clock.format(bars[0].at)),
    svg(
      "text",
      { x: Math.max(LEFT + bars.length * step, LEFT + 150), y: HEIGHT - 6, "text-anchor": "end" },
      clock.format(lastAt),
    ),
  );
  const span = (lastAt - bars[0].at) / 1000;
  const summary =
    `Items finished per ${duration(bucketS)}: ${plural(total, "item")} over ${duration(span)}, ` +
    `peak ${rate(peak / bucketS)}.`;
  return h(
    "figure",
    { class: "chart", "data-testid": "throughput-chart", "data-bars": bars.length },
    svg(
      "svg",
      { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": summary },
      grid,
      columns,
      axis,
    ),
    h("figcaption", {}, summary),
  );
}
