-- wrk script for bench/benchmark.py's transfer scenario: one immediate transfer per request
-- (inTransit false) of 1 unit of a random SKU of SKUS ("X00000" ..) between two random
-- distinct locations of LOCATIONS (comma-separated codes), all seeded with plenty of stock.
-- Environment: SKUS; LOCATIONS; RUN = a run id that keeps idempotency keys unique across runs
-- (each request has its own key); DELAY_MS (optional) = a pause before each request on each
-- connection, for a rate-limited (open-loop) run; API_KEY (optional) = a secret sent as
-- Authorization: Bearer.
-- A 200 answering TransferSuccess counts ok; anything else (GraphQL errors, a typed error such
-- as INSUFFICIENT_STOCK or LOCK_TIMEOUT) counts bad, the first one kept as a sample.
-- done() prints WRKJSON like graphql.lua's.
local skus = tonumber(os.getenv("SKUS") or "1000")
local run = os.getenv("RUN") or tostring(os.time())
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local locations = {}
for code in string.gmatch(os.getenv("LOCATIONS") or "xfer-a,xfer-b,xfer-c,xfer-d", "[^,]+") do
  table.insert(locations, code)
end
local threads = {}
local counter = 0
bad = 0  -- globals: done() reads them per thread with thread:get()
ok = 0
sample = nil
local tid = 0

local headers = {["Content-Type"] = "application/json"}
local api_key = os.getenv("API_KEY")
if api_key and api_key ~= "" then headers["Authorization"] = "Bearer " .. api_key end

function setup(thread)
  tid = tid + 1
  thread:set("tid", tid)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + (tid or 0) * 7919)
end

if delay_ms > 0 then
  function delay() return delay_ms end
end

function request()
  counter = counter + 1
  local from = math.random(1, #locations)
  local to = math.random(1, #locations - 1)
  if to >= from then to = to + 1 end  -- another location than the source
  local body = string.format(
    '{"query":"mutation($i: TransferInput!){transfer(input:$i){__typename ... on TransferSuccess{transfer{id}} ... on Error{code}}}","variables":{"i":{"idempotencyKey":"%s-t%s-%d","fromLocation":"%s","toLocation":"%s","lines":[{"sku":"X%05d","quantity":1}]}}}',
    run, tostring(tid), counter, locations[from], locations[to], math.random(0, skus - 1))
  return wrk.format("POST", "/graphql", headers, body)
end

function response(status, headers, body)
  if status == 200 and not string.find(body, '"errors"', 1, true)
      and string.find(body, '"TransferSuccess"', 1, true) then
    ok = ok + 1
  else
    bad = bad + 1
    if not sample then sample = body end
  end
end

function done(summary, latency, requests)
  local total_ok, total_bad, first = 0, 0, nil
  for _, t in ipairs(threads) do
    total_ok = total_ok + (t:get("ok") or 0)
    total_bad = total_bad + (t:get("bad") or 0)
    first = first or t:get("sample")
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"ok":%d,"bad":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors_socket":%d,"sample":%q}\n',
    summary.requests, total_ok, total_bad, summary.duration, latency:percentile(50),
    latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout + summary.errors.status, first or ""))
end
