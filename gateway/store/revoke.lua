-- Add or widen one revocation, drop the ones no longer in force, bump the list's version.
--
-- KEYS[1]  the revocation hash: field "<kind>:<key>" -> "<issued_before>|<until>" (issued_before
--          empty for "every token of the id"), plus field "version"
-- ARGV     field, issued_before ('' for none), until, now, version seed
-- Returns  the new version (0 when nothing is left in force)
--
-- The version starts at a random seed (not 0) whenever the hash is created, so a reader that
-- holds a version from before the hash expired (or from before a Redis restart lost it) can
-- never mistake the new list for the one it already has.

local key = KEYS[1]
local field = ARGV[1]
local issued_before = ARGV[2]
local until_literal = ARGV[3]
local now = tonumber(ARGV[4])

local function split(value)
  local bar = string.find(value, '|', 1, true)
  return string.sub(value, 1, bar - 1), string.sub(value, bar + 1)
end

-- Widen, never narrow: an empty issued_before (every token) wins, else the later cut-off;
-- the later until wins.
local old = redis.call('HGET', key, field)
if old then
  local old_issued_before, old_until = split(old)
  if issued_before == '' or old_issued_before == '' then
    issued_before = ''
  elseif tonumber(old_issued_before) > tonumber(issued_before) then
    issued_before = old_issued_before
  end
  if tonumber(old_until) > tonumber(until_literal) then
    until_literal = old_until
  end
end
redis.call('HSET', key, field, issued_before .. '|' .. until_literal)
redis.call('HSETNX', key, 'version', ARGV[5])
local version = redis.call('HINCRBY', key, 'version', 1)

-- Prune, and let the whole hash expire with the last entry still in force.
-- Nothing in force: the list (and its version) goes at once.
local in_force = 0
local longest = 0
local entries = redis.call('HGETALL', key)
for i = 1, #entries, 2 do
  if entries[i] ~= 'version' then
    local _, entry_until = split(entries[i + 1])
    local remaining = tonumber(entry_until) - now
    if remaining < 0 then
      redis.call('HDEL', key, entries[i])
    else
      in_force = in_force + 1
      longest = math.max(longest, remaining)
    end
  end
end
if in_force == 0 then
  redis.call('DEL', key)
  return 0
end
redis.call('PEXPIRE', key, string.format('%d', math.max(1, math.ceil(longest * 1000))))
return version
