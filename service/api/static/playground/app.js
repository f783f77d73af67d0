// The charlstm playground: plain JavaScript, no build step, and every request goes to this page's own
// server. Text streams in as Server-Sent Events read from `fetch`, so Stop aborts the request and the
// server frees the stream's row at its next step. Paths are relative, so the page also works behind a
// proxy that serves the API under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const running = new Set();  // AbortControllers of the streams in flight
let activePane = null;
let onlyPane = null;  // the one-off mode's pane
let info = null;  // the last GET /info: each servable model's figures and the limits

// ---------------------------------------------------------------- HTTP

class APIError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function requestHeaders(withBody) {
  const headers = {};
  if (withBody) headers["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();  // read per call: the key lives in this field only
  if (key) headers["Authorization"] = `Bearer ${key}`;
  return headers;
}

async function errorFrom(response) {
  let type = `http_${response.status}`;
  let message = response.statusText || "the request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ type, message } = body.error);
  } catch (_) { /* not the JSON error shape: keep the status line */ }
  if (response.status === 401) message += " (enter it under “API key”)";
  return new APIError(response.status, type, `${response.status} ${type}: ${message}`);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: requestHeaders(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

// An incremental Server-Sent Events parser (the WHATWG rules this server uses): lines end in \r\n, \n
// or \r, a blank line ends an event, lines starting with ":" are comments (the server's pings).
function sseParser(onEvent) {
  let buffer = "";
  let name = "";
  let data = [];
  return (chunk) => {
    buffer += chunk;
    let held = "";
    if (buffer.endsWith("\r")) {  // its \n may be in the next chunk
      held = "\r";
      buffer = buffer.slice(0, -1);
    }
    const lines = buffer.split(/\r\n|\n|\r/);
    buffer = lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(name || "message", data.join("\n"));
        name = "";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
    }
  };
}

// POST `body` with "stream": true to `path` and show the characters in a new call of `pane`.
// Returns the `done` event's body, or null when Stop aborted the stream.
async function streamInto(pane, path, body) {
  const controller = new AbortController();
  const call = pane.beginCall(body.prompt || "");
  pane.setBusy(controller);
  running.add(controller);
  refreshButtons();
  const started = performance.now();
  let first = null;
  let chars = 0;
  try {
    const response = await fetch(path, {
      method: "POST", headers: requestHeaders(true), signal: controller.signal,
      body: JSON.stringify({ ...body, stream: true }),
    });
    if (!response.ok) throw await errorFrom(response);
    let done = null;
    let failure = null;
    const feed = sseParser((event, data) => {
      const message = JSON.parse(data);
      if (event === "token") {
        if (first === null) first = performance.now();
        call.append(message.text);
        chars += [...message.text].length;  // code points: one per model character
        pane.showRate(chars, started, first, performance.now());
      } else if (event === "error") {
        failure = message.error;
      } else if (event === "done") {
        done = message;
      }
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      feed(decoder.decode(value, { stream: true }));
    }
    feed(decoder.decode());
    if (done === null) throw new Error("the stream ended before its done event");
    pane.showRate(chars, started, first, performance.now());
    pane.showDone(done);
    if (failure) showStatus(`${failure.type}: ${failure.message}`, true);
    return done;
  } catch (error) {
    if (controller.signal.aborted) {
      call.stopped(pane.sessionId !== null);
      pane.showFinish(pane.sessionId !== null ? "stopped (the session is unchanged)" : "stopped");
      return null;
    }
    call.discard();
    throw error;
  } finally {
    running.delete(controller);
    pane.setBusy(null);
    refreshButtons();
  }
}

// ---------------------------------------------------------------- panes

class Pane {
  constructor(title, session = null) {
    this.el = $("pane-template").content.firstElementChild.cloneNode(true);
    this.text = this.el.querySelector(".pane-text");
    this.sessionId = session ? session.session_id : null;
    this.model = session ? session.model : null;  // a session's for good; the one-off pane's is its last call's
    this.controller = null;
    this.el.dataset.sessionId = this.sessionId || "";
    this.el.classList.toggle("session", this.sessionId !== null);
    this.name = title;
    this.setPosition(session ? session.position : null);
    const on = (cls, handler) => this.el.querySelector(cls).addEventListener("click", (e) => {
      e.stopPropagation();
      activate(this);
      showStatus("");
      run(handler);
    });
    on(".continue", () => continueSession(this));
    on(".fork", () => forkSession(this));
    on(".export", () => exportSession(this));
    on(".close", () => closePane(this));
    this.el.addEventListener("click", () => activate(this));
    $("panes").append(this.el);
  }

  setPosition(position) {
    this.position = position;
    this.showTitle();
  }

  setModel(model) {
    this.model = model;
    this.showTitle();
  }

  showTitle() {
    const parts = [this.sessionId === null ? this.name : `${this.name} ${this.sessionId.slice(0, 8)}…`];
    if (this.model) parts.push(this.model);
    if (this.position !== null) parts.push(`position ${this.position.toLocaleString("en")}`);
    this.el.querySelector(".pane-title").textContent = parts.join(" · ");
  }

  setBusy(controller) {
    this.controller = controller;
    this.el.classList.toggle("busy", controller !== null);
    for (const b of this.el.querySelectorAll(".continue, .fork")) b.disabled = controller !== null;
  }

  clear() {
    this.text.replaceChildren();
    for (const cls of [".rate", ".finish", ".usage"]) this.el.querySelector(cls).textContent = "";
  }

  // One call: its prompt (shaded) and the characters generated after it.
  beginCall(prompt) {
    const promptSpan = document.createElement("span");
    promptSpan.className = "prompt";
    promptSpan.textContent = prompt;
    const generated = document.createElement("span");
    generated.className = "generated";
    this.text.append(promptSpan, generated);
    this.el.querySelector(".finish").textContent = "";
    const scroller = this.text;
    return {
      append(text) {
        const follow = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 4;
        generated.textContent += text;
        if (follow) scroller.scrollTop = scroller.scrollHeight;
      },
      // A session call that did not complete leaves the session as it was: so must the pane.
      stopped(session) {
        if (session) this.discard();
        else generated.classList.add("stopped");
      },
      discard() {
        promptSpan.remove();
        generated.remove();
      },
    };
  }

  // A fork starts with its parent's text, shown as inherited.
  inherit(other) {
    const copy = document.createElement("span");
    copy.className = "inherited";
    copy.textContent = other.text.textContent;
    this.text.append(copy);
  }

  note(text) {
    const span = document.createElement("span");
    span.className = "inherited";
    span.textContent = text;
    this.text.append(span);
  }

  showRate(chars, started, first, now) {
    const parts = [`${chars.toLocaleString("en")} chars`];
    if (first !== null) {
      // Over the whole call, as the reader sees it: events coalesce, so a rate between two of them misleads.
      const seconds = Math.max(now - started, 1) / 1000;
      parts.push(`${Math.round(chars / seconds).toLocaleString("en")} chars/s`);
      parts.push(`first after ${Math.round(first - started)} ms`);
    }
    this.el.querySelector(".rate").textContent = parts.join(" · ");
  }

  showFinish(reason) {
    this.el.querySelector(".finish").textContent = reason;
  }

  showDone(done) {
    this.showFinish(done.finish_reason);
    const u = done.usage || {};
    this.el.querySelector(".usage").textContent =
      `prompt ${u.prompt_tokens} · generated ${u.completion_tokens} · seed ${done.seed}`;
    if (done.session) this.setPosition(done.session.position);
  }
}

function activate(pane) {
  if (activePane) activePane.el.classList.remove("active");
  activePane = pane;
  if (pane) pane.el.classList.add("active");
  refreshButtons();
}

function sessionPane(title, session) {
  const pane = new Pane(title, session);
  activate(pane);
  return pane;
}

async function closePane(pane) {
  const wasRunning = pane.controller !== null;
  if (wasRunning) pane.controller.abort();
  pane.el.remove();
  if (pane === onlyPane) onlyPane = null;
  if (pane === activePane) activate(null);
  if (pane.sessionId === null) return;
  // A session whose call was just aborted stays busy until the server's next step: ask a few times.
  for (let attempt = 0; ; attempt++) {
    try {
      await api("DELETE", `sessions/${encodeURIComponent(pane.sessionId)}`);
      return;
    } catch (error) {
      if (error instanceof APIError && error.status === 404) return;
      if (!(error instanceof APIError && error.status === 409 && wasRunning && attempt < 10)) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// ---------------------------------------------------------------- actions

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);  // the server checks the bounds and names a bad field
}

function samplingParams() {
  const params = {
    temperature: numberField("temperature"),
    top_k: numberField("top-k"),
    top_p: numberField("top-p"),
    repetition_penalty: numberField("repetition-penalty"),
    max_new_tokens: numberField("max-chars"),
  };
  for (const key of Object.keys(params)) if (params[key] === undefined) delete params[key];
  return params;
}

function sessionMode() {
  return $("mode-session").checked;
}

async function generate() {
  if (!sessionMode()) {
    if (!onlyPane) onlyPane = new Pane("One-off");
    activate(onlyPane);
    onlyPane.clear();
    const body = { ...samplingParams(), prompt: $("prompt").value };
    const seed = numberField("seed");
    if (seed !== undefined) body.seed = seed;
    const model = $("model").value;  // empty until the list has loaded: the server's default then
    if (model) body.model = model;
    onlyPane.setModel(model || null);
    await streamInto(onlyPane, "generate", body);
    return;
  }
  const pane = activePane && activePane.sessionId !== null ? activePane : await newSession();
  await continueSession(pane);
}

// The session belongs to the picked model for good, so its later calls name no model.
async function newSession() {
  const body = {};
  const seed = numberField("seed");
  if (seed !== undefined) body.seed = seed;
  const model = $("model").value;
  if (model) body.model = model;
  const session = await api("POST", "sessions", body);
  return sessionPane("Session", session);
}

// The prompt is fed after the session's state; no seed is sent, so the session's own random stream
// goes on where it stopped. After a completed call the prompt is part of the state and the box empties.
async function continueSession(pane) {
  const prompt = $("prompt").value;
  const done = await streamInto(pane, `sessions/${encodeURIComponent(pane.sessionId)}/generate`,
    { ...samplingParams(), prompt });
  if (done && done.finish_reason !== "error" && $("prompt").value === prompt) $("prompt").value = "";
}

async function forkSession(pane) {
  const session = await api("POST", `sessions/${encodeURIComponent(pane.sessionId)}/fork`, {});
  const child = new Pane("Fork", session);
  child.inherit(pane);
  activate(child);
  showStatus(`Forked session ${pane.sessionId.slice(0, 8)}… into ${session.session_id.slice(0, 8)}…`);
}

async function exportSession(pane) {
  const blob = await api("GET", `sessions/${encodeURIComponent(pane.sessionId)}/export`);
  const file = new Blob([JSON.stringify(blob, null, 2) + "\n"], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(file);
  link.download = `charlstm-session-${pane.sessionId.slice(0, 8)}-${blob.position}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);  // after the browser has read it
  showStatus(`Exported session ${pane.sessionId.slice(0, 8)}… at position ${blob.position} as ${link.download}`);
}

// POST /sessions/import takes the exported object; only its own fields are sent.
async function importSession(file) {
  let blob;
  try {
    blob = JSON.parse(await file.text());
  } catch (_) {
    throw new Error(`${file.name} is not JSON: choose a file saved by Export`);
  }
  if (blob === null || typeof blob !== "object" || typeof blob.data !== "string") {
    throw new Error(`${file.name} is not an exported session (it has no "data")`);
  }
  const body = {};
  for (const key of ["format", "model", "position", "data"]) if (key in blob) body[key] = blob[key];
  const session = await api("POST", "sessions/import", body);
  $("mode-session").checked = true;
  applyMode();
  const pane = sessionPane("Imported", session);
  pane.note(`[imported from ${file.name}: ${blob.model || "model"} at position ${session.position}]\n`);
  showStatus(`Imported ${file.name} as session ${session.session_id.slice(0, 8)}…`);
}

function stopAll() {
  for (const controller of running) controller.abort();
}

// ---------------------------------------------------------------- page state

function showStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

async function run(action) {
  try {
    await action();
  } catch (error) {
    showStatus(error.message || String(error), true);
  }
}

function refreshButtons() {
  $("stop").disabled = running.size === 0;
  const target = sessionMode() ? (activePane && activePane.sessionId !== null ? activePane : null) : onlyPane;
  $("generate").disabled = target !== null && target.controller !== null;
}

function applyMode() {
  document.body.classList.toggle("session-mode", sessionMode());
  if (sessionMode() && activePane && activePane.sessionId === null) activate(null);
  refreshButtons();
}

// The picker lists what GET /v1/models serves. A reload (a key was entered) keeps the pick if it is
// still served; otherwise the server's default is picked.
function fillPicker(ids) {
  const picker = $("model");
  const picked = picker.value;
  const fallback = (info.models.find((m) => m.default) || {}).id;
  picker.replaceChildren(...ids.map((id) => new Option(id === fallback ? `${id} (default)` : id, id)));
  picker.value = [picked, fallback].find((id) => ids.includes(id)) ?? ids[0] ?? "";
}

// The picked model's card figures; /info details the architecture of the default model only.
function describeModel() {
  const id = $("model").value;
  const m = info.models.find((entry) => entry.id === id);
  if (!m) {
    $("model-info").textContent = "No model loaded yet.";
    return;
  }
  const d = info.model && `${info.model.name}@${info.model.version}` === id ? info.model : null;
  const parts = [m.id];
  if (m.parameters) parts.push(`${m.parameters.toLocaleString("en")} parameters`);
  const c = (d && d.config) || {};
  if (c.num_layers && c.hidden_size) parts.push(`${c.num_layers} × ${c.hidden_size} LSTM`);
  if (m.metrics && m.metrics.val_bits_per_char) parts.push(`${m.metrics.val_bits_per_char.toFixed(3)} bits/char on validation`);
  if (d) {
    parts.push(`${d.vocab_size} characters`);
    parts.push(`${d.state_floats_per_session.toLocaleString("en")} state floats per session`);
  }
  if (!m.loaded) parts.push("loads on first use");
  parts.push(`up to ${info.limits.max_batch_size} streams at once`);
  $("model-info").textContent = parts.join(" · ");
}

async function loadInfo() {
  try {
    const [details, list] = await Promise.all([api("GET", "info"), api("GET", "v1/models")]);
    info = details;
    fillPicker(list.data.map((m) => m.id));
    describeModel();
    $("max-chars").max = info.limits.max_new_tokens;
    $("seed").max = info.limits.max_seed;
  } catch (error) {
    $("model-info").textContent = error.message;
  }
}

function start() {
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    showStatus("");
    run(generate);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("controls").requestSubmit();
  });
  $("stop").addEventListener("click", stopAll);
  $("new-session").addEventListener("click", () => run(newSession));
  $("import-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";  // choosing the same file again fires change again
    if (file) run(() => importSession(file));
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
  $("api-key").addEventListener("change", loadInfo);
  $("model").addEventListener("change", describeModel);
  applyMode();
  loadInfo();
}

start();
