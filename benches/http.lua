-- wrk script for benches/http.sh. MODE: bare | keyless | fresh | replay | limit_fresh | limit_replay.
local mode = os.getenv("MODE") or "keyless"
local paths = { bare = "/bare/payments", limit_fresh = "/limit/fresh/payments",
  limit_replay = "/limit/replay/payments" }
-- The memory store has no round trip: its limit is the bare route, sent the very requests the
-- layer's fresh and replay scenarios send (their key header included).
if os.getenv("LIMIT_BARE") == "1" then
  paths.limit_fresh = "/bare/payments"
  paths.limit_replay = "/bare/payments"
end
local path = paths[mode] or "/payments"
local body = '{"amount":1000,"currency":"usd"}'
local counter = 0
local threads = 0
-- Unique per wrk run (benches/http.sh sets it), so that no two runs send the same fresh key.
local run = os.getenv("RUN") or tostring(os.time())

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function request()
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer bench" }
  if mode == "fresh" or mode == "limit_fresh" then
    counter = counter + 1
    headers["Idempotency-Key"] = "fresh-" .. run .. "-" .. tid .. "-" .. counter
  elseif mode == "replay" or mode == "limit_replay" then
    headers["Idempotency-Key"] = "replayed-key"
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT %s %.0f %.1f %.1f %d %d\n", mode, summary.requests / seconds,
    latency:percentile(50), latency:percentile(99), summary.requests, errors))
end
