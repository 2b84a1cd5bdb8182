// The dashboard's shell: the hash router (#/ and #/batches/ID, never a page load), the
// stream indicator, the error banner and the token form shown when the API says 401.

import { AuthRequired, forgetToken, setToken, token } from "./api.js";
import { mountDetail } from "./detail.js";
import { mountFleetStrip } from "./fleet.js";
import { h } from "./dom.js";
import { mountJobs } from "./jobs.js";
import { mountLibraries, mountLibrary } from "./libraries.js";
import { mountList } from "./list.js";

const main = document.querySelector("main");
const live = document.querySelector("[data-testid=live-status]");
const banner = document.querySelector("[data-testid=banner]");
const forgetButton = document.querySelector("[data-testid=forget-token]");

const LIVE_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  final: "Final",
  locked: "Needs a token",
};
const LIVE_TITLE = {
  connecting: "Opening the event stream.",
  live: "Changes arrive as they happen (server-sent events).",
  reconnecting: "The event stream dropped; the browser is reconnecting.",
  offline: "The server refused the event stream or cannot be reached; retrying.",
  final: "This batch has ended: nothing more will change unless it is retried.",
  locked: "The server needs an API token before it streams anything.",
};

let view = null;

function setLive(state) {
  live.dataset.state = state;
  live.title = LIVE_TITLE[state];
  live.querySelector(".live-text").textContent = LIVE_TEXT[state];
}

function clearBanner() {
  banner.hidden = true;
  banner.replaceChildren();
}

function showBanner(message) {
  banner.replaceChildren(
    h("span", {}, message),
    h("button", { type: "button", class: "btn btn-small", onclick: () => render() }, "Try again"),
  );
  banner.hidden = false;
}

/** Handle an error a view could not: a 401 asks for the token, anything else is shown. */
function fail(error) {
  if (error instanceof AuthRequired) {
    askForToken(error.rejected);
    return;
  }
  const message =
    error instanceof TypeError ? "Cannot reach the API; the page retries by itself." : error.message;
  showBanner(message);
}

const ctx = { fail, setLive, clearBanner };

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const batch = path.match(/^\/batches\/(\d{1,19})$/);
  if (batch) return { name: "batch", id: batch[1] };
  const library = path.match(/^\/libraries\/(\d{1,19})$/);
  if (library) return { name: "library", id: library[1] };
  if (path === "/libraries") return { name: "libraries" };
  return { name: "list", query: new URLSearchParams(query) };
}

function unmount() {
  view?.unmount();
  view = null;
}

function render({ focus = false } = {}) {
  unmount();
  clearBanner();
  main.replaceChildren();
  forgetButton.hidden = !token();
  const where = route();
  const mount = {
    batch: () => mountDetail(main, where.id, ctx),
    library: () => mountLibrary(main, where.id, ctx),
    libraries: () => mountLibraries(main, ctx),
  }[where.name];
  view = mount ? mount() : mountList(main, where.query, ctx);
  // A new page for screen readers too: move focus to its heading.
  if (focus) view.heading.focus();
}

function askForToken(rejected) {
  unmount();
  if (rejected) forgetToken();
  setLive("locked");
  forgetButton.hidden = true;
  document.title = "Sign in · pgbatch";
  const input = h("input", {
    id: "token-input",
    name: "token",
    type: "password",
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    "aria-describedby": rejected ? "token-error token-help" : "token-help",
    "aria-invalid": rejected ? "true" : null,
    "data-testid": "token-input",
  });
  const heading = h("h1", { tabindex: -1 }, "This server needs an API token");
  const form = h(
    "form",
    {
      class: "card auth",
      "data-testid": "token-form",
      onsubmit: (event) => {
        event.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        setToken(value);
        render({ focus: true });
        jobs.reload();
      },
    },
    heading,
    h("label", { for: "token-input" }, "API token"),
    input,
    rejected
      ? h("p", { id: "token-error", class: "field-error", role: "alert", "data-testid": "token-error" }, "That token was not accepted. Check it and try again.")
      : null,
    h(
      "p",
      { id: "token-help", class: "hint" },
      "An administrator creates one with ",
      h("code", {}, "pgbatch token new TENANT"),
      ". It shows that tenant's batches. The page keeps it in this tab only (sessionStorage) and forgets it when the tab closes.",
    ),
    h("button", { type: "submit", class: "btn btn-primary", "data-testid": "token-submit" }, "Open the dashboard"),
  );
  main.replaceChildren(h("section", { class: "view auth-view" }, form));
  input.focus();
}

forgetButton.addEventListener("click", () => {
  forgetToken();
  render({ focus: true });
  jobs.reload();
});
window.addEventListener("hashchange", () => render({ focus: true }));
// The active-jobs drawer lives in the top bar: on every page, across route changes.
const jobs = mountJobs(document.querySelector(".topbar-right"));
render();
mountFleetStrip(document.querySelector("[data-testid=fleet-strip]"));
