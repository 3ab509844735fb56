-- Reads a study's sessions and the seq they reflect, atomically. The caller names the session
-- keys it expects (from a plain ZRANGE); if membership changed since, nothing is read and the
-- current members come back so the caller can retry with the right keys.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3..] session hashes
-- ARGV[1..] user ids, in the order of KEYS[3..]
-- Returns {1, seq, hash1, hash2, ...} (each hash a flat HGETALL reply) or {0, members}.

local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local consistent = #members == #ARGV
if consistent then
  local expected = {}
  for i = 1, #ARGV do expected[ARGV[i]] = true end
  for i = 1, #members do
    if not expected[members[i]] then
      consistent = false
      break
    end
  end
end
if not consistent then
  return {0, members}
end

local out = {1, tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')}
for i = 3, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
end
return out
