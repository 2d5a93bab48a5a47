-- wrk script for bench_core.py: rotates requests over random seeded end users, records each
-- response's Server-Timing and client-side latency (1 µs histograms) and status, and stops itself
-- after max_requests.
--
-- Client latency is measured here, not taken from wrk's own latency statistics: on this machine
-- the Debian wrk 4.1.0 summary reports latencies whose sum exceeds the run's wall time with one
-- connection (impossible), at high request rates. Here a request's clock starts in request(),
-- just before wrk writes it, and stops in response(); the response is paired with its request by
-- the end user id it names (the body's "end_user_id" for check and usage, the ceiling's
-- x-echo header), first sent first answered for the same id.
--
--   wrk -t1 -cC -dDs -s bench/load.lua http://127.0.0.1:PORT -- MODE USERS MAX_REQUESTS KEY FEATURE SEED
--
-- MODE: check (GET /v1/entitlements/check), usage (POST /v1/usage, units 1), ceiling (GET /?end_user_id=…).
-- done() prints one line "QSBENCH {json}" that bench_core.py parses.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } qs_timespec;
int clock_gettime(int clk_id, qs_timespec *tp);
]]
local ts = ffi.new("qs_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

-- Globals, so that done() can read them from each thread with thread:get().
st_hist = {}      -- Server-Timing in whole µs -> count
lat_hist = {}     -- client latency in whole µs -> count
unpaired = 0
statuses = {}     -- HTTP status -> count
completed = 0
no_timing = 0
t_first = 0
t_last = 0

local mode, users, max_requests, feature, headers
local inflight = {}  -- end user id -> FIFO of send times
local fmt = string.format
local rand = math.random

function init(args)
  mode = args[1]
  users = tonumber(args[2])
  max_requests = tonumber(args[3])
  feature = args[5]
  math.randomseed(tonumber(args[6]) or os.time())
  headers = {["Authorization"] = "Bearer " .. args[4]}
  if mode == "usage" then
    headers["Content-Type"] = "application/json"
  end
end

local verified = false

function request()
  local t = now()
  local user = fmt("user_%06d", rand(0, users - 1))
  if not verified then
    -- wrk calls request() once on the first thread's Lua state to verify the script
    -- (script_verify_request), before any connection: that request is never sent. Ignoring the
    -- first call is safe either way (at worst one response goes unpaired). Always run with -t1.
    verified = true
  else
    if t_first == 0 then t_first = t end
    local q = inflight[user]
    if q then q[#q + 1] = t else inflight[user] = {t} end
  end
  if mode == "check" then
    return wrk.format("GET", "/v1/entitlements/check?end_user_id=" .. user .. "&feature_key=" .. feature, headers)
  elseif mode == "usage" then
    return wrk.format("POST", "/v1/usage", headers,
      '{"end_user_id":"' .. user .. '","feature_key":"' .. feature .. '","units":1}')
  else
    return wrk.format("GET", "/?end_user_id=" .. user, headers)
  end
end

function response(status, hdrs, body)
  local t = now()
  completed = completed + 1
  t_last = t
  local user
  if mode == "ceiling" then
    user = string.match(hdrs["x-echo"] or "", "user_%d+")
  else
    user = string.match(body, '"end_user_id":"(user_%d+)"')
  end
  local q = user and inflight[user]
  if q then
    local lat = math.floor((t - table.remove(q, 1)) * 1e6 + 0.5)
    lat_hist[lat] = (lat_hist[lat] or 0) + 1
    if #q == 0 then inflight[user] = nil end
  else
    unpaired = unpaired + 1
  end
  statuses[status] = (statuses[status] or 0) + 1
  local st = hdrs["server-timing"] or hdrs["Server-Timing"]
  local dur = st and tonumber(string.match(st, "dur=([%d%.]+)"))
  if dur then
    local us = math.floor(dur * 1000 + 0.5)
    st_hist[us] = (st_hist[us] or 0) + 1
  else
    no_timing = no_timing + 1
  end
  if completed >= max_requests then
    wrk.thread:stop()
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local hist, lhist, stat = {}, {}, {}
  local n, first, last, missing, nopair = 0, nil, 0, 0, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("st_hist")) do hist[k] = (hist[k] or 0) + v end
    for k, v in pairs(t:get("lat_hist")) do lhist[k] = (lhist[k] or 0) + v end
    nopair = nopair + t:get("unpaired")
    for k, v in pairs(t:get("statuses")) do stat[k] = (stat[k] or 0) + v end
    n = n + t:get("completed")
    missing = missing + t:get("no_timing")
    local f, l = t:get("t_first"), t:get("t_last")
    if f > 0 and (first == nil or f < first) then first = f end
    if l > last then last = l end
  end
  local parts = {}
  for k, v in pairs(hist) do table.insert(parts, fmt("[%d,%d]", k, v)) end
  local lparts = {}
  for k, v in pairs(lhist) do table.insert(lparts, fmt("[%d,%d]", k, v)) end
  local sparts = {}
  for k, v in pairs(stat) do table.insert(sparts, fmt('"%d":%d', k, v)) end
  local e = summary.errors
  io.write(fmt('QSBENCH {"completed":%d,"window_s":%.6f,"wrk_requests":%d,"wrk_duration_us":%d,' ..
    '"wrk_latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"no_server_timing":%d,"unpaired":%d,"statuses":{%s},"st_hist_us":[%s],"lat_hist_us":[%s]}\n',
    n, (first and last > first) and (last - first) or 0, summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout,
    missing, nopair, table.concat(sparts, ","), table.concat(parts, ","), table.concat(lparts, ",")))
end
