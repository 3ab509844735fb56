-- Reads a study's sessions and the seq they reflect, atomically. The caller names the session
-- keys it may need (from a plain ZRANGE); if a member has joined since, nothing is read and the
-- current members come back so the caller can retry with their keys too. Named users who have
-- left since are simply absent from the result.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3..] session hashes
-- ARGV[1..] user ids, in the order of KEYS[3..]
-- Returns {1, seq, hash1, hash2, ...} (each hash a flat HGETALL reply, empty for a user who
-- left) or {0, members}.

local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local named = {}
for i = 1, #ARGV do named[ARGV[i]] = true end
for i = 1, #members do
  if not named[members[i]] then
    return {0, members}
  end
end

local out = {1, tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')}
for i = 3, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
end
return out
