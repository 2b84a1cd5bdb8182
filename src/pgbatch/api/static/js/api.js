// The page's only way to the server: JSON requests with the API token, and event
// streams that reconnect by themselves. Paths are relative ("v1/batches"), so the
// dashboard also works when a proxy serves the API under a prefix.

const TOKEN_KEY = "pgbatch.token";
// Reopening a stream the server refused waits this long, doubling up to the maximum
// (the server's own `retry:` of 1 s covers plain network drops).
const REOPEN_MIN_MS = 1000;
const REOPEN_MAX_MS = 15000;

/** The server wants a token (none was sent, or the one sent is not valid). */
export class AuthRequired extends Error {
  constructor(rejected) {
    super(rejected ? "the API token was not accepted" : "this server needs an API token");
    this.rejected = rejected;
  }
}

/** The API answered with an error: `status`, and its `code`, `message` and `field`. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message ?? `the API answered ${status}`);
    this.status = status;
    this.code = error?.code ?? "http_error";
    this.field = error?.field ?? null;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/**
 * Send a request; return {data, etag}. Throw AuthRequired on 401, ApiError on any
 * other error status, TypeError when the server cannot be reached.
 */
export async function request(path, { method = "GET", body, ifMatch } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = token();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (ifMatch) headers["If-Match"] = ifMatch;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 401) throw new AuthRequired(Boolean(bearer));
  const isJson = (response.headers.get("Content-Type") ?? "").includes("json");
  const data = isJson ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, data?.error);
  return { data, etag: response.headers.get("ETag") };
}

/** Return the ETag the API gives a batch: its version, quoted. */
export function etagOf(batch) {
  return `"${batch.version}"`;
}

/**
 * Tell whether snapshot `a` of a batch is newer than `b`: the key (version,
 * shards_done, items_done) only grows, like the server's event ids.
 */
export function isNewer(a, b) {
  if (!b) return true;
  const ka = [a.version, a.shards_done, a.items_done];
  const kb = [b.version, b.shards_done, b.items_done];
  for (let i = 0; i < ka.length; i += 1) {
    if (ka[i] !== kb[i]) return ka[i] > kb[i];
  }
  return false;
}

/**
 * An EventSource on `path` that hands each batch snapshot to `onBatch(batch, ended)`.
 *
 * EventSource sends no headers, so the token travels as `?access_token=`. A dropped
 * connection is retried by the browser; a refused one (401, 5xx) closes the source,
 * and since EventSource cannot tell why, `probe()` asks the API with a plain request:
 * its AuthRequired (or another 4xx) goes to `onFail`, anything else reopens the stream after a backoff.
 * `onState` hears "connecting", "live", "reconnecting" and "offline".
 */
export class LiveStream {
  #path;
  #handlers;
  #source = null;
  #timer = null;
  #failures = 0;
  #closed = false;

  constructor(path, { onOpen, onBatch, onState, probe, onFail }) {
    this.#path = path;
    this.#handlers = { onOpen, onBatch, onState, probe, onFail };
  }

  start() {
    this.#open();
    return this;
  }

  close() {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#source?.close();
    this.#source = null;
  }

  #url() {
    const bearer = token();
    if (!bearer) return this.#path;
    const joiner = this.#path.includes("?") ? "&" : "?";
    return `${this.#path}${joiner}access_token=${encodeURIComponent(bearer)}`;
  }

  #open() {
    if (this.#closed) return;
    const handlers = this.#handlers;
    handlers.onState?.("connecting");
    const source = new EventSource(this.#url());
    this.#source = source;
    source.onopen = () => {
      this.#failures = 0;
      handlers.onState?.("live");
      handlers.onOpen?.();
    };
    const deliver = (ended) => (event) => {
      let batch;
      try {
        batch = JSON.parse(event.data);
      } catch {
        return; // not ours to show; the next event carries the full state again
      }
      handlers.onBatch(batch, ended);
    };
    source.addEventListener("progress", deliver(false));
    source.addEventListener("end", deliver(true));
    source.onerror = () => {
      if (this.#closed || source !== this.#source) return;
      if (source.readyState === EventSource.CONNECTING) {
        handlers.onState?.("reconnecting");
        return;
      }
      source.close();
      handlers.onState?.("offline");
      this.#recover();
    };
  }

  async #recover() {
    // The first refusal is probed at once (it is usually a missing token); later ones
    // back off so a server that is down is not hammered.
    const delay =
      this.#failures === 0 ? 0 : Math.min(REOPEN_MIN_MS * 2 ** (this.#failures - 1), REOPEN_MAX_MS);
    this.#failures += 1;
    await new Promise((resolve) => {
      this.#timer = setTimeout(resolve, delay);
    });
    if (this.#closed) return;
    try {
      await this.#handlers.probe?.();
    } catch (error) {
      if (error instanceof AuthRequired || (error instanceof ApiError && error.status < 500)) {
        this.#handlers.onFail?.(error);
        return;
      }
      // Unreachable or failing: try again later.
      if (!this.#closed) this.#recover();
      return;
    }
    this.#open();
  }
}
