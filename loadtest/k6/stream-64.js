// k6 equivalent of `trioproxy bench --scenario stream-64`: constant VUs, each one
// SSE chat completion after another (64 tokens, 5 ms apart on the project's mock).
//
//   k6 run -e TARGET_URL=http://127.0.0.1:8080 loadtest/k6/stream-64.js     # through the gateway
//   k6 run -e TARGET_URL=http://127.0.0.1:8081 loadtest/k6/stream-64.js     # direct to the upstream
//
// Environment (all optional): TARGET_URL, VUS (64), DURATION (30s), MODEL (mock-llama),
// TOKENS (64), TOKEN_DELAY_MS (5), API_PATH (/v1/chat/completions), SUMMARY_PATH
// (k6-stream-64-summary.json).
//
// k6 reads a response whole, so it cannot see the first token of a stream: its
// "time to first byte" (http_req_waiting) is the time to the response head (plus the
// first event when the server sends them together). TTFT and the gaps between tokens
// are measured by `trioproxy bench`, whose client reads the stream as it comes.

import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';

const TARGET_URL = (__ENV.TARGET_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const VUS = parseInt(__ENV.VUS || '64', 10);
const DURATION = __ENV.DURATION || '30s';
const MODEL = __ENV.MODEL || 'mock-llama';
const TOKENS = __ENV.TOKENS || '64';
const TOKEN_DELAY_MS = __ENV.TOKEN_DELAY_MS || '5';
const PATH = __ENV.API_PATH || '/v1/chat/completions';
const SUMMARY_PATH = __ENV.SUMMARY_PATH || 'k6-stream-64-summary.json';

const errors = new Rate('errors');

export const options = {
  scenarios: {
    streams: { executor: 'constant-vus', vus: VUS, duration: DURATION, gracefulStop: '30s' },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  thresholds: { errors: ['rate<0.001'] },
  // One keep-alive connection per VU, opened once, as `trioproxy bench` does.
  noConnectionReuse: false,
  discardResponseBodies: false,
};

const BODY = JSON.stringify({
  model: MODEL,
  messages: [{ role: 'user', content: 'Say hello to the benchmark.' }],
  stream: true,
  max_tokens: parseInt(TOKENS, 10),
});
const PARAMS = {
  headers: {
    'content-type': 'application/json',
    accept: 'text/event-stream',
    // Pace the project's mock; a real server ignores them (the gateway passes them on).
    'x-mock-tokens': TOKENS,
    'x-mock-token-delay-ms': TOKEN_DELAY_MS,
    'x-mock-ttft-ms': '0',
  },
  timeout: '30s',
  tags: { scenario: 'stream-64' },
};

export default function () {
  const res = http.post(`${TARGET_URL}${PATH}`, BODY, PARAMS);
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    'stream ended with [DONE]': (r) => typeof r.body === 'string' && r.body.includes('data: [DONE]'),
    'no error event': (r) => typeof r.body === 'string' && !r.body.includes('data: {"error"'),
  });
  errors.add(!ok);
}

function trend(metrics, name) {
  const m = metrics[name];
  if (!m) return null;
  const v = m.values;
  return { p50: v.med, p90: v['p(90)'], p95: v['p(95)'], p99: v['p(99)'], max: v.max, avg: v.avg };
}

export function handleSummary(data) {
  const m = data.metrics;
  const summary = {
    scenario: 'stream-64',
    target: TARGET_URL,
    vus: VUS,
    duration: DURATION,
    requests: m.http_reqs ? m.http_reqs.values.count : 0,
    requests_per_s: m.http_reqs ? m.http_reqs.values.rate : 0,
    error_rate: m.errors ? m.errors.values.rate : null,
    checks_passed_rate: m.checks ? m.checks.values.rate : null,
    time_to_first_byte_ms: trend(m, 'http_req_waiting'),
    total_ms: trend(m, 'http_req_duration'),
  };
  const line = (name, t) =>
    t ? `${name}: p50 ${t.p50.toFixed(2)} p90 ${t.p90.toFixed(2)} p95 ${t.p95.toFixed(2)} p99 ${t.p99.toFixed(2)} ms\n` : '';
  const text =
    `stream-64 against ${TARGET_URL}: ${summary.requests} streams, ` +
    `${summary.requests_per_s.toFixed(1)}/s, error rate ${(100 * (summary.error_rate || 0)).toFixed(3)}%\n` +
    line('time to first byte', summary.time_to_first_byte_ms) +
    line('total', summary.total_ms);
  return { stdout: text, [SUMMARY_PATH]: JSON.stringify(summary, null, 2) };
}
