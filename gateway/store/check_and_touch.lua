-- Decide one request's idleness and record its activity, atomically (one round trip).
-- Mirrors tokens.policy.is_idle: idle iff now - last_activity > idle_timeout.
--
-- KEYS[1]  the activity record (a string holding last_activity, seconds as a float literal)
-- ARGV     initial, now ('' = Redis's own clock), idle_timeout, extend (0|1), expires_at, linger,
--          remember_idle (0|1), deadline ('' = none)
-- Returns  {last_activity as it was (the stored literal, or ARGV[1]), idle (0|1, or 2: late),
--          now (the literal decided on)}
--
-- `deadline` is the time (on this clock) after which the caller no longer waits for the answer:
-- it refused the request store_unavailable, so a call Redis runs later than that (a stalled
-- server, a full socket buffer) must not record activity the caller never accepted. It then
-- answers late (2) and writes nothing.
--
-- `now` is Redis's clock (TIME), not the caller's: every replica's decision is taken on one
-- clock, so a replica whose clock lags cannot accept a token that already idled out, nor move
-- its last activity forward and revive it. (A caller's `now` is accepted for tests and
-- simulations with a fake clock only.) Lifetimes are relative PX/PEXPIRE from that same now.
-- Values are written back as literals, so no precision is lost in Lua's number formatting.
--
-- TIME before a write needs effects replication: the default from Redis 5, the only mode from
-- 7; redis.replicate_commands() asks for it on 3.2-4.x (a no-op where it is the default).

if redis.replicate_commands then
  redis.replicate_commands()
end

local key = KEYS[1]
local stored = redis.call('GET', key)
local last_literal = stored or ARGV[1]
local last = tonumber(last_literal)
local now_literal = ARGV[2]
if now_literal == '' then
  local time = redis.call('TIME')  -- {seconds, microseconds}
  now_literal = time[1] .. '.' .. string.format('%06d', tonumber(time[2]))
end
local now = tonumber(now_literal)
if ARGV[8] and ARGV[8] ~= '' and now > tonumber(ARGV[8]) then
  return {last_literal, 2, now_literal}
end
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
  return {last_literal, 1, now_literal}
end

if ARGV[4] ~= '1' then
  return {last_literal, 0, now_literal}
end

-- last_activity never moves backwards: a replica with a slower clock cannot undo a later touch.
local new_literal = last_literal
local new_last = last
if now > last then
  new_literal = now_literal
  new_last = now
end
local keep_until = math.max(tonumber(ARGV[5]), new_last + idle_timeout) + linger
local ttl = math.ceil((keep_until - now) * 1000)

if not stored then
  redis.call('SET', key, new_literal, 'PX', string.format('%d', ttl))
  return {last_literal, 0, now_literal}
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
return {last_literal, 0, now_literal}
