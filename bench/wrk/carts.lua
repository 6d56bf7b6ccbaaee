-- wrk script: carts of 1-5 single-unit lines over SKUS spread SKUs at location "bench".
-- Environment: CARTS = carts per request (1: one reserve per request; N > 1: one reserveMany
-- of N carts); SKUS; RUN = a run id that keeps idempotency keys unique across runs.
-- done() prints WRKJSON with requests, carts sent and carts reserved (ReserveSuccess).
local per = tonumber(os.getenv("CARTS") or "1")
local skus = tonumber(os.getenv("SKUS") or "10000")
local run = os.getenv("RUN") or tostring(os.time())
local threads = {}
local counter = 0
bad = 0
ok = 0
carts_ok = 0
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

local function cart()
  counter = counter + 1
  local lines, seen = {}, {}
  local n = math.random(1, 5)
  while #lines < n do
    local i = math.random(0, skus - 1)
    if not seen[i] then
      seen[i] = true
      table.insert(lines, string.format('{"sku":"S%05d","location":"bench","quantity":1}', i))
    end
  end
  return string.format('{"idempotencyKey":"%s-%s-%d","lines":[%s]}',
    run, tostring(tid), counter, table.concat(lines, ","))
end

function request()
  local body
  if per == 1 then
    body = string.format(
      '{"query":"mutation($i: ReserveInput!){reserve(input:$i){__typename}}","variables":{"i":%s}}',
      cart())
  else
    local carts = {}
    for _ = 1, per do table.insert(carts, cart()) end
    body = string.format(
      '{"query":"mutation($i: ReserveManyInput!){reserveMany(input:$i){results{__typename}}}","variables":{"i":{"carts":[%s]}}}',
      table.concat(carts, ","))
  end
  return wrk.format("POST", "/graphql", headers, body)
end

function response(status, headers, body)
  if status ~= 200 or string.find(body, '"errors"', 1, true) then
    bad = bad + 1
    if not sample then sample = body end
    return
  end
  ok = ok + 1
  local _, n = string.gsub(body, '"ReserveSuccess"', "")
  carts_ok = carts_ok + n
end

function done(summary, latency, requests)
  local total_ok, total_bad, total_carts, first = 0, 0, 0, nil
  for _, t in ipairs(threads) do
    total_ok = total_ok + (t:get("ok") or 0)
    total_bad = total_bad + (t:get("bad") or 0)
    total_carts = total_carts + (t:get("carts_ok") or 0)
    first = first or t:get("sample")
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"ok":%d,"bad":%d,"carts_ok":%d,"per":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"sample":%q}\n',
    summary.requests, total_ok, total_bad, total_carts, per, summary.duration,
    latency:percentile(50), latency:percentile(99), first or ""))
end
