-- Read the revocation list only when it changed since the reader's version (one round trip).
--
-- KEYS[1]  the revocation hash (see revoke.lua)
-- ARGV     the reader's version
-- Returns  {version} when unchanged, else {version, field1, value1, field2, value2, ...}
--          (version '0' when there is no list at all)

local version = redis.call('HGET', KEYS[1], 'version') or '0'
if version == ARGV[1] then
  return {version}
end
local reply = {version}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if entries[i] ~= 'version' then
    reply[#reply + 1] = entries[i]
    reply[#reply + 1] = entries[i + 1]
  end
end
return reply
