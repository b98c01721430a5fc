// k6 equivalent of `trioproxy bench --scenario throughput`: 256 constant VUs, each one
// small non-streamed chat completion after another (closed loop, keep-alive).
//
//   k6 run -e TARGET_URL=http://127.0.0.1:8080 loadtest/k6/throughput.js    # through the gateway
//   k6 run -e TARGET_URL=http://127.0.0.1:8081 loadtest/k6/throughput.js    # direct to the upstream
//
// Environment (all optional): TARGET_URL, VUS (256), DURATION (30s), MODEL (mock-llama),
// TOKENS (16), API_PATH (/v1/chat/completions), SUMMARY_PATH (k6-throughput-summary.json).
//
// Open loop, as `trioproxy bench --scenario open-loop-200`: set RATE (requests started per
// second) and k6's constant-arrival-rate executor starts them on schedule, on VUS
// pre-allocated VUs and at most MAX_VUS (default 2 x VUS), whatever the answers take:
//
//   k6 run -e RATE=200 -e VUS=32 -e TARGET_URL=http://127.0.0.1:8080 loadtest/k6/throughput.js
//
// A request k6 could not start on time (every VU busy) is counted in dropped_iterations,
// not queued; unlike `trioproxy bench`, k6 does not count such a wait in a latency. Read
// dropped iterations as "the target fell behind".
//
// k6 itself costs far more CPU per request than the gateway: on a 2-core machine,
// pin it away from the gateway (`taskset -c 1 k6 run ...`) and read requests/s as
// "at least"; `trioproxy bench` reports how busy the client's core was.

import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';

const TARGET_URL = (__ENV.TARGET_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const VUS = parseInt(__ENV.VUS || '256', 10);
const RATE = parseInt(__ENV.RATE || '0', 10); // 0: closed loop
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(2 * VUS), 10);
const DURATION = __ENV.DURATION || '30s';
const MODEL = __ENV.MODEL || 'mock-llama';
const TOKENS = __ENV.TOKENS || '16';
const PATH = __ENV.API_PATH || '/v1/chat/completions';
const SUMMARY_PATH = __ENV.SUMMARY_PATH || 'k6-throughput-summary.json';

const errors = new Rate('errors');

export const options = {
  scenarios: {
    load: RATE
      ? {
          executor: 'constant-arrival-rate',
          rate: RATE,
          timeUnit: '1s',
          duration: DURATION,
          preAllocatedVUs: VUS,
          maxVUs: MAX_VUS,
          gracefulStop: '10s',
        }
      : { executor: 'constant-vus', vus: VUS, duration: DURATION, gracefulStop: '10s' },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  thresholds: { errors: ['rate<0.001'] },
  noConnectionReuse: false,
};

const BODY = JSON.stringify({
  model: MODEL,
  messages: [{ role: 'user', content: 'Say hello to the benchmark.' }],
  stream: false,
  max_tokens: parseInt(TOKENS, 10),
});
const PARAMS = {
  headers: {
    'content-type': 'application/json',
    accept: 'application/json',
    'x-mock-tokens': TOKENS,
    'x-mock-ttft-ms': '0',
  },
  timeout: '30s',
  tags: { scenario: 'throughput' },
};

export default function () {
  const res = http.post(`${TARGET_URL}${PATH}`, BODY, PARAMS);
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    'has choices': (r) => typeof r.body === 'string' && r.body.includes('"choices"'),
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
    scenario: 'throughput',
    target: TARGET_URL,
    vus: VUS,
    rate: RATE || null,
    duration: DURATION,
    requests: m.http_reqs ? m.http_reqs.values.count : 0,
    requests_per_s: m.http_reqs ? m.http_reqs.values.rate : 0,
    dropped_iterations: m.dropped_iterations ? m.dropped_iterations.values.count : 0,
    error_rate: m.errors ? m.errors.values.rate : null,
    checks_passed_rate: m.checks ? m.checks.values.rate : null,
    time_to_first_byte_ms: trend(m, 'http_req_waiting'),
    total_ms: trend(m, 'http_req_duration'),
  };
  const line = (name, t) =>
    t ? `${name}: p50 ${t.p50.toFixed(2)} p90 ${t.p90.toFixed(2)} p95 ${t.p95.toFixed(2)} p99 ${t.p99.toFixed(2)} ms\n` : '';
  const text =
    `throughput${RATE ? ` (open loop at ${RATE}/s)` : ''} against ${TARGET_URL}: ${summary.requests} requests, ` +
    `${summary.requests_per_s.toFixed(1)}/s, ` +
    (RATE ? `${summary.dropped_iterations} not started on time, ` : '') +
    `error rate ${(100 * (summary.error_rate || 0)).toFixed(3)}%\n` +
    line('time to first byte', summary.time_to_first_byte_ms) +
    line('total', summary.total_ms);
  return { stdout: text, [SUMMARY_PATH]: JSON.stringify(summary, null, 2) };
}
