-- wrk script for stockledger's GraphQL endpoint.
-- Environment: SCENARIO = spread | hot | cart | balance | transfer; SKUS = number of spread
-- (or transfer) SKUs; LOCATIONS (transfer) = comma-separated codes, all seeded with plenty of
-- stock: one immediate transfer of 1 unit of a random "X00000".. SKU between two of them;
-- RUN = a run id that keeps idempotency keys unique across runs; DELAY_MS (optional) = a pause
-- before each request on each connection, for a rate-limited (open-loop) run.
-- Every response body is checked: a 200 with GraphQL errors or an unexpected __typename
-- counts as a failure, printed as JSON by done().
local scenario = os.getenv("SCENARIO") or "spread"
local skus = tonumber(os.getenv("SKUS") or "10000")
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

-- API_KEY (optional): a secret sent as Authorization: Bearer (keys are required by default).
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
  -- wrk calls delay() before each request of a connection: a steady offered rate.
  function delay() return delay_ms end
end

local function sku(i) return string.format("S%05d", i) end

local function reserve_body(lines)
  counter = counter + 1
  local parts = {}
  for _, s in ipairs(lines) do
    table.insert(parts, string.format('{"sku":"%s","location":"bench","quantity":1}', s))
  end
  return string.format(
    '{"query":"mutation($i: ReserveInput!){reserve(input:$i){__typename ... on ReserveSuccess{reservation{id}} ... on Error{code}}}","variables":{"i":{"idempotencyKey":"%s-%s-%d","lines":[%s]}}}',
    run, tostring(tid), counter, table.concat(parts, ","))
end

function request()
  local body
  if scenario == "hot" then
    body = reserve_body({"HOT"})
  elseif scenario == "cart" then
    local lines, seen = {}, {}
    while #lines < 10 do
      local i = math.random(0, skus - 1)
      if not seen[i] then seen[i] = true; table.insert(lines, sku(i)) end
    end
    body = reserve_body(lines)
  elseif scenario == "balance" then
    body = string.format(
      '{"query":"query($s: String!){balance(sku:$s, location:\\"bench\\"){onHand reserved available}}","variables":{"s":"%s"}}',
      sku(math.random(0, skus - 1)))
  elseif scenario == "transfer" then
    counter = counter + 1
    local from = math.random(1, #locations)
    local to = math.random(1, #locations - 1)
    if to >= from then to = to + 1 end  -- another location than the source
    body = string.format(
      '{"query":"mutation($i: TransferInput!){transfer(input:$i){__typename ... on TransferSuccess{transfer{id}} ... on Error{code}}}","variables":{"i":{"idempotencyKey":"%s-t%s-%d","fromLocation":"%s","toLocation":"%s","lines":[{"sku":"X%05d","quantity":1}]}}}',
      run, tostring(tid), counter, locations[from], locations[to], math.random(0, skus - 1))
  else
    body = reserve_body({sku(math.random(0, skus - 1))})
  end
  return wrk.format("POST", "/graphql", headers, body)
end

function response(status, headers, body)
  local good
  if status ~= 200 or string.find(body, '"errors"', 1, true) then
    good = false
  elseif scenario == "balance" then
    good = string.find(body, '"onHand"', 1, true) ~= nil
  elseif scenario == "transfer" then
    good = string.find(body, '"TransferSuccess"', 1, true) ~= nil
  else
    good = string.find(body, '"ReserveSuccess"', 1, true) ~= nil
  end
  if good then ok = ok + 1 else bad = bad + 1; if not sample then sample = body end end
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
