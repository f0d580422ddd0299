-- Decide one request's idleness and record its activity, atomically (one round trip).
-- Mirrors tokens.policy.is_idle: idle iff now - last_activity > idle_timeout.
--
-- KEYS[1]  the activity record (a string holding last_activity, seconds as a float literal)
-- ARGV     initial, now, idle_timeout, extend (0|1), expires_at, linger, remember_idle (0|1)
-- Returns  {last_activity as it was (the stored literal, or ARGV[1]), idle (0|1)}
--
-- Times are the caller's clock, never Redis's: lifetimes are set with relative PX/PEXPIRE so a
-- gateway with a different (or fake) clock still gets the intended lifetime. Values are written
-- back as the caller's own literals, so no precision is lost in Lua's number formatting.

local key = KEYS[1]
local stored = redis.call('GET', key)
local last_literal = stored or ARGV[1]
local last = tonumber(last_literal)
local now = tonumber(ARGV[2])
local idle_timeout = tonumber(ARGV[3])
local linger = tonumber(ARGV[6])

local function ms(seconds)
  return string.format('%d', math.ceil(seconds * 1000))
end

if now - last > idle_timeout then
  -- Refused: nothing moves. With remember_idle, an unseen id gets a record (last = initial) so
  -- that later tokens of the same session are refused too, for as long as the linger lasts.
  if not stored and ARGV[7] == '1' then
    local remaining = last + idle_timeout + linger - now
    if remaining > 0 then
      redis.call('SET', key, last_literal, 'PX', ms(remaining))
    end
  end
  return {last_literal, 1}
end

if ARGV[4] ~= '1' then
  return {last_literal, 0}
end

-- last_activity never moves backwards: a replica with a slower clock cannot undo a later touch.
local new_literal = last_literal
local new_last = last
if now > last then
  new_literal = ARGV[2]
  new_last = now
end
local keep_until = math.max(tonumber(ARGV[5]), new_last + idle_timeout) + linger
local ttl = math.ceil((keep_until - now) * 1000)

if not stored then
  redis.call('SET', key, new_literal, 'PX', string.format('%d', ttl))
  return {last_literal, 0}
end

-- Never shorten a lifetime another request (e.g. a longer-lived token of the session) set.
local current = redis.call('PTTL', key)
if current > ttl then
  ttl = current
end
if new_literal ~= last_literal then
  redis.call('SET', key, new_literal, 'PX', string.format('%d', ttl))
elseif current < ttl then
  redis.call('PEXPIRE', key, string.format('%d', ttl))
end
return {last_literal, 0}
