-- Write batched activity (store.coalesce): for each key, what check_and_touch.lua writes for an
-- accepted request with extend, but at the time the activity happened, decided locally by a
-- replica that had accepted the token through the store less than store.coalesce before.
--
-- KEYS     activity records (with Redis Cluster: of one hash slot per call)
-- ARGV[1]  now ('' = Redis's own clock, as in check_and_touch.lua; a value: tests' fake clock)
-- ARGV[2]  flushed: the moment the caller made the batch, on Redis's clock ('' = unknown: TIME)
-- ARGV     then 6 per key: at, age, initial, idle_timeout, expires_at, linger
--          at: the caller's clock at the activity (used only with a given now);
--          age: seconds from the activity to `flushed` on the caller's monotonic clock
-- Returns  per key: 1 written, 0 nothing newer to write, -1 idle already (nothing written)
--
-- The activity's time is flushed - age: on Redis's clock, never beyond its now, whatever the
-- replica's wall clock says, and the same however late Redis runs the call (a stalled server,
-- a full socket buffer: TIME - age would stamp the activity that much later than it happened).
-- last_activity never moves backwards, a record's lifetime is never
-- shortened, and a record Redis already considers idle is left alone: idling out is terminal,
-- a late flush must not revive a token another replica was refused for.

if redis.replicate_commands then
  redis.replicate_commands()
end

local now_literal = ARGV[1]
local caller_time = now_literal ~= ''
if not caller_time then
  local time = redis.call('TIME')  -- {seconds, microseconds}
  now_literal = time[1] .. '.' .. string.format('%06d', tonumber(time[2]))
end
local now = tonumber(now_literal)
local flushed = now
if ARGV[2] ~= '' and tonumber(ARGV[2]) < now then
  flushed = tonumber(ARGV[2])
end

local results = {}
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 6
  local at_literal = ARGV[base + 1]
  local age = tonumber(ARGV[base + 2])
  local initial_literal = ARGV[base + 3]
  local idle_timeout = tonumber(ARGV[base + 4])
  local expires_at = tonumber(ARGV[base + 5])
  local linger = tonumber(ARGV[base + 6])

  local activity_literal
  if caller_time then
    activity_literal = at_literal
    if tonumber(at_literal) > now then
      activity_literal = now_literal
    end
  else
    if age < 0 then
      age = 0
    end
    activity_literal = string.format('%.6f', flushed - age)
  end
  local activity = tonumber(activity_literal)

  local stored = redis.call('GET', key)
  local last_literal = stored or initial_literal
  local last = tonumber(last_literal)
  if now - last > idle_timeout then
    results[i] = -1
  else
    local new_literal = last_literal
    local new_last = last
    if activity > last then
      new_literal = activity_literal
      new_last = activity
    end
    local keep_until = math.max(expires_at, new_last + idle_timeout) + linger
    local ttl = math.max(1, math.ceil((keep_until - now) * 1000))
    results[i] = 0
    if not stored then
      redis.call('SET', key, new_literal, 'PX', string.format('%d', ttl))
      results[i] = 1
    else
      local current = redis.call('PTTL', key)
      if current > ttl then
        ttl = current
      end
      if new_literal ~= last_literal then
        redis.call('SET', key, new_literal, 'PX', string.format('%d', ttl))
        results[i] = 1
      elseif current < ttl then
        redis.call('PEXPIRE', key, string.format('%d', ttl))
        results[i] = 1
      end
    end
  end
end
return results
