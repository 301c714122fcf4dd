// The HTTP API client: every request goes through `api()`, so the API key header, the error
// shape and network failures are handled in one place.

const KEY_STORAGE = "atelier.apiKey";

export function getKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** An error answer of the API ({"error": {type, message, param}}) or a network failure. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = "network_error", param = null, retryAfter = null, errors = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
    this.retryAfter = retryAfter;
    this.errors = errors; // workflow validation: every problem, with node and field
  }
}

function sameOrigin(url) {
  return new URL(url, location.href).origin === location.origin;
}

/** Headers for a request to `url`; the key goes only to this server, never to a presigned S3 URL. */
function authHeaders(url) {
  const key = getKey();
  return key && sameOrigin(url) ? { Authorization: `Bearer ${key}` } : {};
}

async function send(url, init = {}) {
  let response;
  try {
    response = await fetch(url, { ...init, headers: { ...authHeaders(url), ...(init.headers || {}) } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Could not reach the server. Check your connection and try again.");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON: a proxy's error page, say */
  }
  const err = body && body.error ? body.error : {};
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(err.message || `The server answered ${response.status} ${response.statusText}`.trim(), {
    status: response.status,
    type: err.type || "http_error",
    param: err.param || null,
    retryAfter: Number.isFinite(retry) ? retry : null,
    errors: err.errors || null,
  });
}

/**
 * Call the API. `json` sends a JSON body, `form` a FormData (multipart); `query` adds
 * search parameters (empty values left out). Returns the parsed JSON answer.
 */
export async function api(method, path, { json, form, query, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const init = { method, signal, headers: {} };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form; // the browser sets the multipart boundary
  }
  const response = await send(url.href, init);
  return response.status === 204 ? null : response.json();
}

/** A URL usable in <img>/<video> src: plain when no key is set, else a blob: URL of the fetched bytes. */
export async function mediaUrl(url) {
  if (!getKey() || !sameOrigin(url)) return url;
  const response = await send(url);
  return URL.createObjectURL(await response.blob());
}

/**
 * Read a server-sent event stream with fetch (EventSource cannot send the API key).
 * Calls onEvent({event, data}) for each event; resolves when the stream ends.
 */
export async function readEvents(path, onEvent, signal) {
  const response = await send(new URL(path, location.origin).href, {
    signal,
    headers: { Accept: "text/event-stream" },
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        // a blank line ends an event
        if (data.length) onEvent({ event, data: data.join("\n") });
        event = "message";
        data = [];
      } else if (line.startsWith(":")) {
        continue; // comment / keep-alive
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
    }
  }
}

const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/**
 * Follow a job's SSE events until it ends, calling onUpdate(job) on every change; resolves
 * with the final job. A dropped stream is reopened (it starts with the current state).
 */
export async function followJob(jobId, onUpdate, signal) {
  let job = null;
  for (let attempt = 0; ; attempt++) {
    try {
      await readEvents(`/v1/jobs/${encodeURIComponent(jobId)}/events`, ({ event, data }) => {
        if (event === "job") {
          job = JSON.parse(data);
          onUpdate(job);
        }
      }, signal);
    } catch (err) {
      // An API answer (404, 401...) will not change on retry; a dropped connection may.
      if (err.name === "AbortError" || err.status || attempt >= 5) throw err;
    }
    if (job && TERMINAL.has(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** attempt, 8000)));
  }
}
