// The live dashboard of /_/: usage records and upstream changes from the /_/live WebSocket,
// in-flight counts from /readyz. Plain ES2020, no dependencies; record text is only ever
// set with textContent, never parsed as HTML.
"use strict";

const WINDOW_MS = 10_000;     // rates and percentiles: the last 10 s
const CHART_MS = 60_000;      // the TTFT chart: the last 60 s
const RECENT_ROWS = 20;
const READYZ_EVERY_MS = 1_000;
const HIDDEN_ROUTES = new Set(["/healthz", "/readyz", "/metrics", "/_/live", "/_/", "/_/dashboard.js", "/_/dashboard.css"]);

const state = {
  window: [],                 // [{at, record}] of the last WINDOW_MS
  chart: [],                  // [{at, ttft}] of the last CHART_MS
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
  if (HIDDEN_ROUTES.has(rec.route)) return;
  const at = Date.now();
  state.total += 1;
  state.window.push({ at, record: rec });
  if (typeof rec.ttft_ms === "number") state.chart.push({ at, ttft: rec.ttft_ms });
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

let socket = null;
let retryMs = 500;

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/_/live`);
  socket.onopen = () => {
    retryMs = 500;
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
    const why = close.code === 1013 ? "too slow, dropped" : close.code === 1001 ? "gateway stopping" : "disconnected";
    setStatus("reconnecting", `${why}: reconnecting in ${(retryMs / 1000).toFixed(1)} s`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10_000);
  };
}

function setStatus(stateName, text) {
  const el = $("status");
  el.dataset.state = stateName;
  el.textContent = text;
}

// --- /readyz --------------------------------------------------------------------------------

async function pollReadyz() {
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    const doc = await response.json();
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
  }
}

function renderUpstreams() {
  const body = $("upstreams").tBodies[0];
  body.replaceChildren();
  for (const [id, u] of [...state.upstreams.entries()].sort()) {
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
  while (state.chart.length && state.chart[0].at < now - CHART_MS) state.chart.shift();
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

function renderChart(now) {
  const canvas = $("ttft-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.documentElement);
  const pad = { left: 52, right: 10, top: 10, bottom: 22 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const max = Math.max(10, ...state.chart.map((p) => p.ttft)) * 1.1;
  const x = (at) => pad.left + plotW * (1 - (now - at) / CHART_MS);
  const y = (ms) => pad.top + plotH * (1 - ms / max);
  ctx.strokeStyle = styles.getPropertyValue("--line");
  ctx.fillStyle = styles.getPropertyValue("--muted");
  ctx.font = "11px 'DejaVu Sans', sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {  // y grid: 0 .. max ms
    const ms = (max * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y(ms)); ctx.lineTo(width - pad.right, y(ms)); ctx.stroke();
    ctx.fillText(`${fmtMs(ms)} ms`, 4, y(ms) + 4);
  }
  for (let s = 0; s <= 60; s += 10) ctx.fillText(s ? `-${s}s` : "now", x(now - s * 1000) - 12, height - 6);
  ctx.fillStyle = styles.getPropertyValue("--accent");
  for (const p of state.chart) { ctx.fillRect(x(p.at) - 1.5, y(p.ttft) - 1.5, 3, 3); }
  // p50 per 2 s bucket
  const buckets = new Map();
  for (const p of state.chart) {
    const key = Math.floor(p.at / 2000);
    if (!buckets.has(key)) buckets.set(key, []);
    buckets.get(key).push(p.ttft);
  }
  ctx.strokeStyle = styles.getPropertyValue("--ok");
  ctx.lineWidth = 2;
  ctx.beginPath();
  let first = true;
  for (const key of [...buckets.keys()].sort((a, b) => a - b)) {
    const values = buckets.get(key).sort((a, b) => a - b);
    const px = x(key * 2000 + 1000), py = y(percentile(values, 0.5));
    if (first) { ctx.moveTo(px, py); first = false; } else { ctx.lineTo(px, py); }
  }
  ctx.stroke();
}

function tick() {
  const now = Date.now();
  renderTiles(now);
  renderChart(now);
}

connect();
pollReadyz();
setInterval(pollReadyz, READYZ_EVERY_MS);
setInterval(tick, 500);
tick();
