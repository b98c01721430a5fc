// The live dashboard of /_/: usage records and upstream changes from the /_/live WebSocket,
// in-flight counts from /readyz. Plain ES2020, no dependencies; record text is only ever
// set with textContent, never parsed as HTML.
"use strict";

const WINDOW_MS = 10_000;     // rates and percentiles: the last 10 s
const CHART_BARS = 60;        // the TTFT chart: the last 60 requests that had a first token
const CHART_MIN_SLOTS = 20;   // ...drawn at least this narrow, so the first few bars are not a wall
const RECENT_ROWS = 20;
const READYZ_EVERY_MS = 1_000;
const READYZ_TIMEOUT_MS = 2_000;
const RETRY_MIN_MS = 500, RETRY_MAX_MS = 10_000;  // WebSocket reconnect backoff (doubling, jittered)
// Probe and admin routes are not application traffic (as `trioproxy top`); nor is anything under /_/
// (this page, its files, its feed, reloads).
const HIDDEN_ROUTES = new Set(["/healthz", "/readyz", "/metrics"]);
const hidden = (route) => HIDDEN_ROUTES.has(route) || (typeof route === "string" && route.startsWith("/_/"));

const state = {
  window: [],                 // [{at, record}] of the last WINDOW_MS
  chart: [],                  // [{ttft, ok}] of the last CHART_BARS requests with a TTFT
  total: 0,
  upstreams: new Map(),       // id → {healthy, circuit, reason, in_flight, state_for_s}
  inFlight: null,
};

const $ = (id) => document.getElementById(id);

function percentile(sorted, q) {
  if (!sorted.length) return null;
  const rank = Math.max(1, Math.ceil(q * sorted.length));  // nearest rank, as `trioproxy stats`
  return sorted[rank - 1];
}

function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

function timeOf(ts) {
  // The record's ts is ISO 8601 UTC ("2026-11-24T09:30:00.123Z"); shown in the browser's time zone.
  const at = typeof ts === "string" ? new Date(ts) : new Date();
  return Number.isNaN(at.getTime()) ? "–" : at.toLocaleTimeString();
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function outcomeClass(outcome) {
  return outcome === "ok" ? "good" : outcome === "client_disconnect" || outcome === "rejected" ? "warn" : "bad";
}

// --- the feed -------------------------------------------------------------------------------

function onRecord(rec) {
  if (hidden(rec.route)) return;
  state.total += 1;
  state.window.push({ at: Date.now(), record: rec });  // arrival here: the window is "seen in the last 10 s"
  if (typeof rec.ttft_ms === "number") {
    state.chart.push({ ttft: rec.ttft_ms, ok: rec.outcome === "ok" });
    if (state.chart.length > CHART_BARS) state.chart.shift();
  }
  addRecentRow(rec);
}

function onUpstream(event) {
  if (event.removed) {
    state.upstreams.delete(event.upstream);
  } else {
    const known = state.upstreams.get(event.upstream) || {};
    state.upstreams.set(event.upstream, { ...known, healthy: event.healthy, circuit: event.circuit, reason: event.reason });
  }
  renderUpstreams();
}

function addRecentRow(rec) {
  const body = $("recent").tBodies[0];
  const row = document.createElement("tr");
  row.dataset.requestId = rec.request_id || "";
  cell(row, timeOf(rec.ts));
  cell(row, rec.request_id, "id");
  cell(row, rec.route);
  cell(row, rec.model_served || rec.model_requested);
  cell(row, rec.upstream);
  const outcome = rec.status ? `${rec.outcome} (${rec.status})` : rec.outcome;
  cell(row, outcome, outcomeClass(rec.outcome)).dataset.outcome = rec.outcome;
  cell(row, fmtMs(rec.ttft_ms), "num");
  cell(row, fmtMs(rec.total_ms), "num");
  cell(row, `${rec.prompt_tokens ?? "–"} / ${rec.completion_tokens ?? "–"}`, "num");
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > RECENT_ROWS) body.deleteRow(body.rows.length - 1);
}

let retryMs = RETRY_MIN_MS;

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/_/live`);
  socket.onopen = () => {
    retryMs = RETRY_MIN_MS;
    setStatus("connected", "connected");
  };
  socket.onmessage = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch (err) {
      return;
    }
    if (event.type === "record" && event.record) onRecord(event.record);
    else if (event.type === "upstream") onUpstream(event);
  };
  socket.onclose = (close) => {
    // 1013: the gateway dropped this page for falling behind; 1001: it is stopping; 1008: not allowed.
    const why = { 1013: "too slow, dropped", 1001: "gateway stopping", 1008: "refused" }[close.code] || "disconnected";
    const delay = retryMs * (0.5 + Math.random() / 2);  // jitter: many open pages do not reconnect in step
    setStatus("reconnecting", `${why}: reconnecting in ${(delay / 1000).toFixed(1)} s`);
    setTimeout(connect, delay);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  };
}

function setStatus(stateName, text) {
  const el = $("status");
  el.dataset.state = stateName;
  el.textContent = text;
}

// --- /readyz --------------------------------------------------------------------------------

async function pollReadyz() {
  // One poll at a time, each bounded: a stuck gateway does not pile requests up in the page.
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), READYZ_TIMEOUT_MS);
  try {
    const response = await fetch("/readyz", { cache: "no-store", signal: abort.signal });
    const doc = await response.json();  // 503 (not ready) carries the same document
    let inFlight = 0;
    for (const [id, u] of Object.entries(doc.upstreams || {})) {
      const known = state.upstreams.get(id) || {};
      state.upstreams.set(id, { ...known, healthy: u.healthy, circuit: u.circuit, reason: u.reason,
        in_flight: u.in_flight, state_for_s: u.state_for_s });
      inFlight += u.in_flight || 0;
    }
    for (const id of [...state.upstreams.keys()]) {
      if (!(id in (doc.upstreams || {}))) state.upstreams.delete(id);
    }
    state.inFlight = inFlight;
    renderUpstreams();
  } catch (err) {
    state.inFlight = null;  // the gateway is away; the WebSocket status says so
  } finally {
    clearTimeout(timer);
    setTimeout(pollReadyz, READYZ_EVERY_MS);
  }
}

let shownUpstreams = "";

function renderUpstreams() {
  // Rebuilt only when something shown changed: a poll a second must not keep undoing a text selection.
  const entries = [...state.upstreams.entries()].sort(([a], [b]) => a.localeCompare(b));
  const key = JSON.stringify(entries);
  if (key === shownUpstreams) return;
  shownUpstreams = key;
  const body = $("upstreams").tBodies[0];
  body.replaceChildren();
  for (const [id, u] of entries) {
    const row = document.createElement("tr");
    row.dataset.upstream = id;
    cell(row, id);
    cell(row, u.healthy === false ? "down" : "up", u.healthy === false ? "bad" : "good");
    cell(row, u.circuit, u.circuit === "closed" ? "good" : u.circuit === "open" ? "bad" : "warn");
    cell(row, u.in_flight ?? "–", "num");
    cell(row, typeof u.state_for_s === "number" ? `${u.state_for_s.toFixed(0)} s` : "–");
    cell(row, u.reason || "");
    body.appendChild(row);
  }
}

// --- the numbers and the chart ------------------------------------------------------------

function renderTiles(now) {
  while (state.window.length && state.window[0].at < now - WINDOW_MS) state.window.shift();
  const records = state.window.map((w) => w.record);
  const seconds = WINDOW_MS / 1000;
  const ttfts = records.map((r) => r.ttft_ms).filter((v) => typeof v === "number").sort((a, b) => a - b);
  const tokens = records.reduce((sum, r) => sum + (r.completion_tokens || 0), 0);
  const errors = records.filter((r) => r.outcome !== "ok").length;
  $("rps").textContent = (records.length / seconds).toFixed(1);
  $("ttft-p50").textContent = ttfts.length ? `${fmtMs(percentile(ttfts, 0.5))} ms` : "–";
  $("ttft-p99").textContent = ttfts.length ? `${fmtMs(percentile(ttfts, 0.99))} ms` : "–";
  $("tps").textContent = (tokens / seconds).toFixed(0);
  $("errors").textContent = String(errors);
  $("errors").className = errors ? "value bad" : "value";
  $("in-flight").textContent = state.inFlight === null ? "–" : String(state.inFlight);
  $("total").textContent = String(state.total);
}

function renderChart() {
  // One bar per request that had a first token (oldest left, newest right), coloured by outcome;
  // dashed lines at the p50 and p99 of those bars. Per request rather than per second, so a burst
  // reads as clearly as a steady trickle.
  const canvas = $("ttft-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const pad = { left: 64, right: 84, top: 12, bottom: 24 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const points = state.chart;
  const sorted = points.map((p) => p.ttft).sort((a, b) => a - b);
  const max = niceCeiling(Math.max(10, ...sorted) * 1.1);
  const y = (ms) => pad.top + plotH * (1 - ms / max);
  ctx.font = "11px 'DejaVu Sans', system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {  // y grid: 0 .. max ms
    const ms = (max * i) / 4;
    ctx.strokeStyle = color("--line");
    ctx.beginPath(); ctx.moveTo(pad.left, y(ms) + 0.5); ctx.lineTo(pad.left + plotW, y(ms) + 0.5); ctx.stroke();
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "right";
    ctx.fillText(`${fmtMs(ms)} ms`, pad.left - 8, y(ms));
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  ctx.fillText("← older", pad.left, height - 6);
  ctx.textAlign = "right";
  ctx.fillText("newest", pad.left + plotW, height - 6);
  if (!points.length) {
    ctx.textAlign = "center";
    ctx.fillText("no streamed request yet", pad.left + plotW / 2, pad.top + plotH / 2);
    return;
  }
  const slots = Math.min(CHART_BARS, Math.max(CHART_MIN_SLOTS, points.length));  // a few bars are not a wall
  const slot = plotW / slots;
  const barW = Math.max(2, slot * 0.7);
  points.forEach((p, i) => {
    const x = pad.left + slot * (slots - points.length + i) + (slot - barW) / 2;
    ctx.fillStyle = color(p.ok ? "--accent" : "--bad");
    ctx.fillRect(x, y(p.ttft), barW, pad.top + plotH - y(p.ttft));
  });
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.setLineDash([5, 4]);
  for (const [label, q, name] of [["p50", 0.5, "--ok"], ["p99", 0.99, "--warn"]]) {
    const ms = percentile(sorted, q);
    ctx.strokeStyle = ctx.fillStyle = color(name);
    ctx.beginPath(); ctx.moveTo(pad.left, y(ms) + 0.5); ctx.lineTo(pad.left + plotW, y(ms) + 0.5); ctx.stroke();
    ctx.fillText(`${label} ${fmtMs(ms)} ms`, pad.left + plotW + 6, y(ms) + (q === 0.5 ? 7 : -7));
  }
  ctx.setLineDash([]);
}

function niceCeiling(v) {
  // 1, 2 or 5 × a power of ten: round axis labels.
  const power = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((c) => c >= v);
}

function tick() {
  const now = Date.now();
  renderTiles(now);
  renderChart();
}

connect();
pollReadyz();
setInterval(tick, 500);
tick();
