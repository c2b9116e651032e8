// trioserve status page. Plain JavaScript, no build step, no library.
//
// Data flow: one read of /admin/status at load (and after each reconnect), then two streams —
// /admin/events (lifecycle events: state changes show at once) and /admin/activity (the chart's
// history, then one sample a second with every model's and user's figures, each memory
// budget's, and the MCP endpoint's: open sessions and calls in flight, null when [mcp] is off).
// Streams are read with fetch, not EventSource, because EventSource cannot send the admin key
// as a header.
//
// Everything the daemon sends (model names, errors, log lines) is untrusted text: it reaches
// the page only through textContent and SVG attributes, never as HTML.
//
// Who may do what (the daemon decides; /admin/status says "admin": true|false for this page):
// - admin: the Load, Unload, Force and Logs buttons are there. With admin_keys set that takes
//   a key (the page asks for one); with admin_keys empty, the local admin token, which
//   `trioserve ui` hands over in the URL's fragment (/ui#token=…), or admin_over_tcp = "open".
// - read-only: status, chart, events and users stay live; the actions are not shown, and a
//   note says how to get write access. A token that stopped working (the daemon restarted and
//   wrote a new one) brings the page here too, saying so.
// The token and a typed key are one credential, kept in sessionStorage (this tab only) and sent
// as a bearer header.
"use strict";

const KEY_STORAGE = "trioserve.adminKey";
const KEY_FROM_STORAGE = "trioserve.adminKeyFrom";  // "token" (from the URL) or "key" (typed)
const RECONNECT_FIRST = 500;      // ms: first retry after a lost connection
const RECONNECT_MAX = 10000;      // ms: retries back off up to this
const LOGS_TAIL = 500;            // lines the log view shows
const LOGS_EVERY = 1000;          // ms between two reads of the followed log
const CHART_SECONDS = 600;
const MIN_CHART_SECONDS = 60;
const SVG_NS = "http://www.w3.org/2000/svg";

const page = {
  models: {},       // name -> status object (contract fields + tokens_per_s)
  users: {},        // name -> per-user figures
  mcp: null,        // {sessions, calls_in_flight}, or null: no MCP endpoint
  devices: {},      // device -> {budget, used, free} in bytes; {} without memory budgets
  history: {},      // name -> {at: [], in_flight: [], queued: [], tokens_per_s: []}
  historyLength: 600,
  logsModel: null,
  logsTimer: null,
  session: null,    // AbortController of the current connection
  retryDelay: RECONNECT_FIRST,
  admin: false,     // the daemon's last word: may this page do admin calls?
  tokenChanged: false,  // the tab's admin token stopped working (a restarted daemon)
};

class KeyRequired extends Error {}

// -- the local admin token from `trioserve ui` ----------------------------------------------

// `trioserve ui` prints /ui#token=…: a fragment is never sent to the server (nor in a Referer),
// so the token stays out of every log. The page moves it into sessionStorage and out of the
// address bar at once, so it is not bookmarked, kept in the history or seen in a screenshot.
// Returns whether a token was taken.
function takeTokenFromUrl() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("token")) return false;
  const token = (fragment.get("token") || "").trim();
  fragment.delete("token");
  const rest = fragment.toString();
  const address = location.pathname + location.search + (rest ? "#" + rest : "");
  history.replaceState(history.state, "", address);
  if (!token) return false;
  sessionStorage.setItem(KEY_STORAGE, token);
  sessionStorage.setItem(KEY_FROM_STORAGE, "token");
  page.tokenChanged = false;
  return true;
}

takeTokenFromUrl();  // before anything else: the page's first request already carries it

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// -- talking to the daemon ------------------------------------------------------------------

function headers(extra) {
  const result = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) result["Authorization"] = "Bearer " + key;
  return result;
}

async function request(path, options) {
  const opts = Object.assign({cache: "no-store", credentials: "omit"}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) throw new KeyRequired();
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}

// Calls onEvent(name, data) for each SSE event of the response until the stream ends.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

async function follow(path, signal, onEvent) {
  const response = await request(path, {signal});
  if (!response.ok) throw new Error(await errorText(response));
  await readEvents(response, onEvent);
  throw new Error("the daemon closed " + path);
}

// -- connection -----------------------------------------------------------------------------

function showConnection(state, text) {
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = text;
}

async function connect() {
  const session = new AbortController();
  page.session = session;
  try {
    showConnection("connecting", "connecting…");
    const response = await request("/admin/status", {signal: session.signal});
    if (!response.ok) throw new Error(await errorText(response));
    applyStatus(await response.json());
    const streams = [
      follow("/admin/events", session.signal, onLifecycleEvent),
      follow("/admin/activity", session.signal, onActivity),
    ];
    showConnection("live", page.admin ? "live" : "live · read-only");
    page.retryDelay = RECONNECT_FIRST;
    await Promise.race(streams);
  } catch (error) {
    session.abort();
    if (page.session !== session) return;  // replaced by a newer connection
    if (error instanceof KeyRequired) {
      askForKey();
      return;
    }
    const delay = page.retryDelay;
    page.retryDelay = Math.min(delay * 2, RECONNECT_MAX);
    showConnection("lost", "connection lost — retrying in " + (delay / 1000).toFixed(1) + " s");
    setTimeout(() => { if (page.session === session) connect(); }, delay);
  }
}

// A new connection, now: after a new token, or when an admin call was refused (the connection
// then learns from /admin/status whether a key is needed or the page is read-only).
function reconnect() {
  if (page.session) page.session.abort();
  page.retryDelay = RECONNECT_FIRST;
  connect();
}

// Only with admin_keys set: every /admin call needs a key, reads too.
function askForKey() {
  const hadKey = sessionStorage.getItem(KEY_STORAGE) !== null;
  const fromToken = sessionStorage.getItem(KEY_FROM_STORAGE) === "token";
  forgetKey();
  showConnection("key", "admin key required");
  $("read-only").hidden = true;
  $("key-form").hidden = false;
  const message = $("key-error");
  message.hidden = !hadKey;
  message.textContent = !hadKey ? ""
    : fromToken ? "This daemon takes one of its admin keys, not the local admin token."
    : "That key was refused.";
  $("key-input").focus();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(KEY_FROM_STORAGE);
}

// The daemon says whether this page is admin; a credential it no longer takes is dropped.
function setAccess(admin) {
  if (admin) {
    page.tokenChanged = false;
  } else if (sessionStorage.getItem(KEY_STORAGE) !== null) {
    if (sessionStorage.getItem(KEY_FROM_STORAGE) === "token") page.tokenChanged = true;
    forgetKey();
  }
  page.admin = admin;
  document.body.dataset.access = admin ? "admin" : "read-only";
  $("read-only").hidden = admin;
  $("read-only-how").hidden = page.tokenChanged;
  $("read-only-changed").hidden = !page.tokenChanged;
  if (!admin) closeLogs();
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  sessionStorage.setItem(KEY_FROM_STORAGE, "key");
  $("key-input").value = "";
  $("key-form").hidden = true;
  connect();
}

// -- data in --------------------------------------------------------------------------------

function applyStatus(status) {
  page.models = Object.assign({}, status.models);
  page.users = Object.assign({}, status.users);
  page.mcp = status.mcp || null;
  page.devices = status.devices || {};
  $("daemon").textContent = "v" + status.version + " · pid " + status.pid;
  setAccess(status.admin !== false);
  renderModels();
  renderDevices();
  renderUsers();
  renderMcp();
}

function onLifecycleEvent(name, event) {
  const model = page.models[event.model];
  if (!model) return;
  model.state = event.to;
  if (event.to === "failed" && event.reason) model.last_error = event.reason;
  renderModels();
}

function onActivity(name, data) {
  if (name === "history") {
    page.history = data.models;
    page.historyLength = Math.max(1, Math.round(data.seconds / data.interval));
  } else if (name === "sample") {
    page.models = data.models;
    page.users = data.users;
    page.mcp = data.mcp || null;
    page.devices = data.devices || {};
    for (const [model, sample] of Object.entries(data.models)) {
      const series = page.history[model] ||
        (page.history[model] = {at: [], in_flight: [], queued: [], tokens_per_s: []});
      series.at.push(data.at);
      series.in_flight.push(sample.in_flight);
      series.queued.push(sample.queued);
      series.tokens_per_s.push(sample.tokens_per_s || 0);
      for (const column of Object.values(series)) {
        while (column.length > page.historyLength) column.shift();
      }
    }
    for (const model of Object.keys(page.history)) {
      if (!(model in data.models)) delete page.history[model];
    }
    renderModels();
    renderDevices();
    renderUsers();
    renderMcp();
  }
  renderCharts();
}

// -- models table ---------------------------------------------------------------------------

function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "";
  const s = Math.floor(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function ago(timestamp) {
  if (!timestamp) return "never";
  return duration(Date.now() / 1000 - timestamp) + " ago";
}

function actionButton(label, title, onClick, className) {
  const button = el("button", label, className);
  button.type = "button";
  button.title = title;
  button.addEventListener("click", () => onClick(button));
  return button;
}

const COLUMNS = ["name", "state", "pid", "port", "uptime", "in-flight", "queued", "restarts",
                 "last-used", "memory", "last-error", "actions"];

// A model's row is made once and updated in place: a button being clicked, a disabled button
// (a Load still waiting) or an opened error survive the updates.
function modelRow(name) {
  const row = el("tr");
  row.dataset.model = name;
  row.cells_ = {};
  for (const column of COLUMNS) {
    const cell = el("td", null, column);
    row.cells_[column] = cell;
    row.appendChild(cell);
  }
  row.cells_.name.textContent = name;
  row.cells_.name.appendChild(el("span", null, "marks"));
  const error = el("details");
  error.appendChild(el("summary"));
  error.appendChild(el("pre"));
  row.cells_["last-error"].appendChild(error);
  const actions = row.cells_.actions;
  actions.appendChild(actionButton("Load", "start it and wait until ready", (b) => act(b, name, "load")));
  actions.appendChild(actionButton("Unload", "stop it after in-flight requests finish", (b) => act(b, name, "unload")));
  actions.appendChild(actionButton("Force", "kill it now", (b) => act(b, name, "unload?force=true"), "danger"));
  actions.appendChild(actionButton("Logs", "show its output", () => openLogs(name)));
  return row;
}

function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function updateRow(row, model) {
  const cells = row.cells_;
  row.dataset.state = model.state;
  setText(cells.state, model.state);
  cells.state.className = "state state-" + model.state;
  setText(cells.pid, model.pid);
  setText(cells.port, model.port);
  const up = model.state === "ready" && model.started_at ? Date.now() / 1000 - model.started_at : null;
  setText(cells.uptime, duration(up));
  setText(cells["in-flight"], model.in_flight ?? 0);
  setText(cells.queued, model.queued ?? 0);
  setText(cells.restarts, model.restarts ?? 0);
  setText(cells["last-used"], ago(model.last_used_at));
  setText(cells.name.lastChild, [model.pinned && "pinned", model.preload && "preload"]
    .filter(Boolean).join(" · "));
  updateMemory(cells.memory, model);
  const error = cells["last-error"].firstChild;
  const text = model.last_error || "";
  error.hidden = !text;
  setText(error.firstChild, text.split("\n")[0]);
  setText(error.lastChild, text);
}

function renderModels() {
  const body = $("models").tBodies[0];
  const existing = new Map([...body.rows].map((row) => [row.dataset.model, row]));
  const names = Object.keys(page.models).sort();
  names.forEach((name, index) => {
    const row = existing.get(name) || modelRow(name);
    updateRow(row, page.models[name]);
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    existing.delete(name);
  });
  for (const row of existing.values()) row.remove();
  renderModelNotes(names);
}

// -- memory ---------------------------------------------------------------------------------

// Bytes as the daemon prints them: one decimal in the largest binary unit that fits.
function formatSize(bytes) {
  const units = [[2 ** 40, "TiB"], [2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]];
  for (const [unit, name] of units) {
    if (Math.abs(bytes) >= unit) return (bytes / unit).toFixed(1) + " " + name;
  }
  return bytes + " B";
}

// A model's memory, a line per device: estimated (declared or from its GGUF) and measured,
// each where known ("cpu: est. 6.0 GiB · measured 5.8 GiB"); "unknown" while neither is.
// Rebuilt only when a figure changed.
function updateMemory(cell, model) {
  const memory = model.memory || {};
  const estimated = memory.estimated || {};
  const measured = memory.measured || {};
  const key = JSON.stringify([estimated, measured]);
  if (cell.dataset.key === key) return;
  cell.dataset.key = key;
  // Its own devices first; then others it was measured on (a GPU model's host memory).
  const devices = new Set([...(model.devices || []), ...Object.keys(estimated),
                           ...Object.keys(measured)]);
  const lines = [];
  for (const device of devices) {
    const figures = [];
    if (device in estimated) figures.push("est. " + formatSize(estimated[device]));
    if (device in measured) figures.push("measured " + formatSize(measured[device]));
    if (!figures.length) continue;
    const line = el("div", null, "memory-device");
    line.dataset.device = device;
    line.appendChild(el("span", device + ": ", "device"));
    line.appendChild(document.createTextNode(figures.join(" · ")));
    lines.push(line);
  }
  if (!lines.length) lines.push(el("span", "unknown", "muted"));
  cell.replaceChildren(...lines);
}

// Under the models table: why a model's start waits (memory, a max_loaded slot) and what its
// memory figures warn of ("measured 7.2 GiB on cuda:0, 20% over the 6.0 GiB declared: …").
function renderModelNotes(names) {
  const notes = [];
  for (const name of names) {
    const model = page.models[name];
    if (model.waiting_for) notes.push([name, "waiting", model.waiting_for]);
    for (const warning of model.warnings || []) {
      notes.push([name, "warning", warning]);
    }
  }
  const list = $("model-notes");
  const key = JSON.stringify(notes);
  list.hidden = !notes.length;
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  list.replaceChildren(...notes.map(([name, kind, text]) => {
    const item = el("li", null, kind);
    item.dataset.model = name;
    item.dataset.kind = kind;
    item.appendChild(el("strong", name + ": "));
    item.appendChild(document.createTextNode(text));
    return item;
  }));
}

// Each budgeted device: a gauge of what placement counts there against its budget, and the
// figures; the section is hidden without budgets.
function renderDevices() {
  const entries = Object.entries(page.devices);
  $("devices-section").hidden = !entries.length;
  const box = $("devices");
  const key = JSON.stringify(entries);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...entries.map(([device, figures]) => {
    const row = el("div", null, "device-row");
    row.dataset.device = device;
    row.appendChild(el("span", device, "device-name"));
    const gauge = el("meter");
    gauge.min = 0;
    gauge.max = Math.max(1, figures.budget);
    gauge.value = Math.max(0, figures.used);
    gauge.high = gauge.max * 0.9;  // nearly full: the browser draws it in its warning colour
    gauge.title = formatSize(figures.used) + " of " + formatSize(figures.budget);
    row.appendChild(gauge);
    const text = formatSize(figures.used) + " used of " + formatSize(figures.budget) + " · " +
      formatSize(figures.free) + " free";
    row.appendChild(el("span", text, "device-figures" + (figures.free < 0 ? " error" : "")));
    return row;
  }));
}

function notice(text, kind) {
  const node = $("notice");
  node.textContent = text;
  node.dataset.kind = kind;
  node.hidden = false;
}

async function act(button, name, action) {
  if (!page.admin) return;
  button.disabled = true;
  try {
    const response = await request(
      "/admin/models/" + encodeURIComponent(name) + "/" + action,
      // JSON, so a browser must ask before sending it cross-site (and trioserve never agrees).
      {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"},
    );
    if (response.ok) {
      const body = await response.json();
      notice(body.model + ": " + body.state, "ok");
    } else {
      notice(name + ": " + (await errorText(response)), "error");
    }
  } catch (error) {
    if (error instanceof KeyRequired) reconnect();
    else notice(name + ": " + error.message, "error");
  } finally {
    button.disabled = false;
  }
}

// -- users table ----------------------------------------------------------------------------

function renderUsers() {
  const rows = [];
  for (const name of Object.keys(page.users).sort()) {
    const user = page.users[name];
    const row = el("tr");
    row.dataset.user = name;
    for (const value of [name, user.in_flight, user.queued, user.requests,
                         user.prompt_tokens, user.completion_tokens]) {
      row.appendChild(el("td", value));
    }
    rows.push(row);
  }
  $("users").tBodies[0].replaceChildren(...rows);
}

// The MCP endpoint's figures, one line under the users ("MCP: 2 sessions, 1 call in flight");
// hidden when the daemon runs no MCP endpoint.
function renderMcp() {
  const node = $("mcp");
  const mcp = page.mcp;
  node.hidden = !mcp;
  if (!mcp) return;
  const count = (n, one, many) => n + " " + (n === 1 ? one : many);
  node.dataset.sessions = mcp.sessions;
  node.dataset.callsInFlight = mcp.calls_in_flight;
  setText(node, "MCP: " + count(mcp.sessions, "session", "sessions") + ", " +
    count(mcp.calls_in_flight, "call", "calls") + " in flight");
}

// -- activity charts ------------------------------------------------------------------------

function svg(tag, attributes) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  return node;
}

function niceMax(values) {
  const top = Math.max(1, ...values);
  const step = Math.pow(10, Math.floor(Math.log10(top)));
  return Math.ceil(top / step) * step;
}

function polyline(series, values, now, span, width, height, top, className) {
  const points = [];
  for (let i = 0; i < values.length; i++) {
    const x = width - ((now - series.at[i]) / span) * width;
    if (x < 0) continue;
    const y = height - (values[i] / top) * height;
    points.push(x.toFixed(1) + "," + y.toFixed(1));
  }
  return svg("polyline", {points: points.join(" "), class: className});
}

// The time axis spans the history there is (at least a minute, at most ten), so a young
// daemon's chart is readable too.
function chartSpan(now) {
  let oldest = now;
  for (const series of Object.values(page.history)) {
    if (series.at.length) oldest = Math.min(oldest, series.at[0]);
  }
  return Math.min(CHART_SECONDS, Math.max(MIN_CHART_SECONDS, now - oldest));
}

function chart(name, series, now, span) {
  const width = 600, height = 100;
  const box = el("div", null, "chart");
  box.dataset.model = name;
  box.appendChild(el("h3", name));
  const drawing = svg("svg", {viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none",
                              role: "img", "aria-label": "activity of " + name});
  const requestsTop = niceMax([...series.in_flight, ...series.queued]);
  const tokensTop = niceMax(series.tokens_per_s);
  drawing.appendChild(svg("line", {x1: 0, y1: height, x2: width, y2: height, class: "axis"}));
  drawing.appendChild(svg("line", {x1: 0, y1: 0, x2: width, y2: 0, class: "axis"}));
  drawing.appendChild(polyline(series, series.queued, now, span, width, height, requestsTop, "series-queued"));
  drawing.appendChild(polyline(series, series.in_flight, now, span, width, height, requestsTop, "series-in-flight"));
  drawing.appendChild(polyline(series, series.tokens_per_s, now, span, width, height, tokensTop, "series-tokens"));
  box.appendChild(drawing);
  const caption = "last " + duration(span) + " · requests ≤ " + requestsTop +
    " · tokens/s ≤ " + tokensTop;
  box.appendChild(el("div", caption, "scale"));
  return box;
}

function renderCharts() {
  const names = Object.keys(page.history).sort();
  let now = 0;
  for (const name of names) {
    const at = page.history[name].at;
    if (at.length) now = Math.max(now, at[at.length - 1]);
  }
  const span = chartSpan(now);
  $("charts").replaceChildren(...names.map((name) => chart(name, page.history[name], now, span)));
}

// -- logs -----------------------------------------------------------------------------------

async function readLogs() {
  const name = page.logsModel;
  if (name === null) return;
  try {
    const response = await request(
      "/admin/models/" + encodeURIComponent(name) + "/logs?tail=" + LOGS_TAIL);
    if (page.logsModel !== name) return;
    const text = response.ok ? await response.text() : await errorText(response);
    const view = $("logs-text");
    const atBottom = view.scrollTop + view.clientHeight >= view.scrollHeight - 4;
    if (view.textContent !== text) {
      view.textContent = text;
      if (atBottom) view.scrollTop = view.scrollHeight;
    }
  } catch (error) {
    if (error instanceof KeyRequired) {
      closeLogs();
      reconnect();
    }
  }
  if (page.logsModel === name) page.logsTimer = setTimeout(readLogs, LOGS_EVERY);
}

function openLogs(name) {
  if (!page.admin) return;
  closeLogs();
  page.logsModel = name;
  $("logs-model").textContent = name;
  $("logs-text").textContent = "";
  $("logs").hidden = false;
  readLogs();
}

function closeLogs() {
  page.logsModel = null;
  clearTimeout(page.logsTimer);
  $("logs").hidden = true;
}

// -- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", onKeySubmit);
  $("logs-close").addEventListener("click", closeLogs);
  // `trioserve ui`'s URL pasted into this tab changes only the fragment: no new page load.
  window.addEventListener("hashchange", () => { if (takeTokenFromUrl()) reconnect(); });
  // Uptimes and "last used" move with the clock between two samples.
  setInterval(renderModels, 1000);
  connect();
});
