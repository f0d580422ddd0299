-- wrk script: every request carries `Authorization: Bearer <token>`, cycling through a pool of
-- distinct tokens read from a file (one per line). Requests are pre-formatted in init(), so the
-- per-request cost in wrk is one table lookup.
--
--   wrk -t1 -c50 -d10s -s bench/auth.lua http://127.0.0.1:8080/api/orders -- tokens.txt [start]
--
-- done() prints one line `BENCH_JSON {...}` with the totals and latency percentiles (µs).

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  local requests = {}
  local file = assert(io.open(path, "r"))
  for line in file:lines() do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. line })
    end
  end
  file:close()
  assert(#requests > 0, "no tokens in " .. path)
  pool = requests
  size = #requests
  -- args[2]: where in the pool to start (a run continuing an earlier one passes how many
  -- requests went before, so that a long series of runs walks the whole pool).
  -- Threads start at different places in the pool so they do not move in lockstep.
  index = (tonumber(args[2] or "0") + (id or 0) * 7919) % size
end

function request()
  index = index + 1
  if index > size then
    index = 1
  end
  return pool[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max
  ))
end
